"""The deployments a station keeps on its Prefect server, created or updated whenever its executor starts.

`process-recording/<station>` is what each recording's run is created from (and what the UI reruns);
`maintenance/<station>` is the re-drive sweep, retention and compaction. In a fleet both belong to the
station's work pool; prefect.yaml declares the same deployments for `prefect deploy`.
"""

from __future__ import annotations

from typing import cast
from uuid import UUID

from prefect.deployments.runner import EntrypointType, RunnerDeployment

from birdflow.settings import Settings
from flows.executor import StationDeployments
from flows.maintenance import maintenance
from flows.process_recording import process_recording


def deployment_name(settings: Settings) -> str:
    return settings.station_id


def ensure_deployment(settings: Settings) -> UUID:
    """The station's process-recording deployment (created or updated); its runs execute here."""
    deployment = cast(
        RunnerDeployment,
        process_recording.to_deployment(
            name=deployment_name(settings),
            tags=["birdflow", settings.station_id],
            description=f"Recordings of station {settings.station_id}, executed in-process by `birdflow execute`.",
            entrypoint_type=EntrypointType.MODULE_PATH,
        ),
    )
    # in a fleet the deployment belongs to the station's work pool (prefect.yaml), which this keeps
    return cast(UUID, deployment.apply(work_pool_name=settings.prefect.work_pool or None))


def ensure_maintenance_deployment(settings: Settings) -> UUID:
    """The station's maintenance deployment. The executor starts its runs every maintenance_interval_s
    (Prefect 3.8's scheduler cannot insert runs with SQLAlchemy 2.1); a Quick run from the UI works too."""
    deployment = cast(
        RunnerDeployment,
        maintenance.to_deployment(
            name=deployment_name(settings),
            tags=["birdflow", "maintenance", settings.station_id],
            description=(
                f"Re-drive, retention and compaction of station {settings.station_id}; "
                f"run by its executor every {settings.unattended.maintenance_interval_s:.0f} s."
            ),
            entrypoint_type=EntrypointType.MODULE_PATH,
        ),
    )
    return cast(UUID, deployment.apply(work_pool_name=settings.prefect.work_pool or None))


def register_deployments(settings: Settings) -> StationDeployments:
    """Both of the station's deployments, created or updated, for its executor to run."""
    return StationDeployments(
        recordings=ensure_deployment(settings), maintenance=ensure_maintenance_deployment(settings)
    )
