"""The deployments a station keeps on its Prefect server, created or updated whenever its executor starts.

`process-recording/<station>` is what each recording's run is created from (and what the UI reruns);
`maintenance/<station>` is the re-drive sweep, retention and compaction; `review-detection/<station>` holds the
runs that wait for a person's verdict on a detection. In a fleet both belong to the
station's work pool; prefect.yaml declares the same deployments for `prefect deploy`.
"""

from __future__ import annotations

from typing import cast
from uuid import UUID

from prefect.deployments.runner import EntrypointType, RunnerDeployment

from birdflow.flows.executor import StationDeployments
from birdflow.flows.maintenance import maintenance
from birdflow.flows.process_recording import process_recording
from birdflow.flows.review import review_detection
from birdflow.settings import Settings


def deployment_name(settings: Settings) -> str:
    return settings.station_id


def _apply(flow, settings: Settings, tags: list[str], description: str) -> UUID:
    """The flow's deployment named for the station, created or updated; in a fleet it belongs to the station's
    work pool (prefect.yaml), which this keeps."""
    deployment = cast(
        RunnerDeployment,
        flow.to_deployment(
            name=deployment_name(settings),
            tags=["birdflow", *tags, settings.station_id],
            description=description,
            entrypoint_type=EntrypointType.MODULE_PATH,
        ),
    )
    # a station that keeps its own run history has its work pool on the central server, not on its own
    pool = None if settings.prefect.central_api_url else settings.prefect.work_pool or None
    return cast(UUID, deployment.apply(work_pool_name=pool))


def register_deployments(settings: Settings) -> StationDeployments:
    """The station's deployments, created or updated, for its executor to run. Maintenance runs are started by the
    executor every maintenance_interval_s (Prefect 3.8's scheduler could not insert runs with SQLAlchemy 2.1; 3.9's
    can, so a schedule on the deployment could take this over); a Quick run from the UI works too."""
    station = settings.station_id
    return StationDeployments(
        recordings=_apply(
            process_recording,
            settings,
            [],
            f"Recordings of station {station}, executed in-process by `birdflow execute`.",
        ),
        maintenance=_apply(
            maintenance,
            settings,
            ["maintenance"],
            f"Re-drive, retention and compaction of station {station}; "
            f"run by its executor every {settings.unattended.maintenance_interval_s:.0f} s.",
        ),
        reviews=_apply(
            review_detection,
            settings,
            ["review"],
            f"Detections of station {station} waiting for a person's verdict: resume a run with the form.",
        ),
    )
