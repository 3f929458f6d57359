"""The maintenance flow: what keeps a station running unattended, on a schedule whose runs show in the UI.

- It re-drives failed recording runs that nothing re-drove yet. The executor re-drives the runs it
  executes as soon as they fail; this catches the rest (runs of a worker, runs left by a stopped executor).
- It applies retention: cached results older than run_retention_days (or than the oldest run the disk budget
  kept), the processed record within its share of that budget, the local archive's caps, temporary files of
  interrupted writes; it announces archived audio that was deleted; it merges the detections into hourly
  Parquet files.
- It writes the hourly species counts of closed hours to the sinks (Parquet, Influx `species_hourly`).
- It ends the review runs still waiting for a detection decided elsewhere (a `birdflow review` that could not
  reach the Prefect API).

Flow runs themselves (with their task runs, logs and artifacts) are deleted by the Prefect server's own
db_vacuum service, which `birdflow up` turns on for run_retention_days, and sooner by the embedded server's
history budget (birdflow.app.prefect_server).
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Any

from prefect import flow, get_client, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterStartTime,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import FlowRunSort

from birdflow.core.budget import RECORD_SHARE
from birdflow.core.health import closed_spool_files, health_table, read_spool
from birdflow.core.mqtt_messages import health_messages
from birdflow.core.results import ResultsDatabase
from birdflow.core.retention import DAY_S, PurgeJournal, remove_stale_files
from birdflow.core.sinks import compact_detections, write_all
from birdflow.flows.announce import announce_purged
from birdflow.flows.redrive import GIVEN_UP, redrive_or_give_up
from birdflow.flows.review import end_decided_reviews
from birdflow.flows.run_resources import run_resources
from birdflow.runtime import metrics
from birdflow.runtime.archive_retention import archive_retention
from birdflow.runtime.mqtt import topics_of
from birdflow.settings import Settings

SWEEP_BATCH = 200
# a run that failed this recently is being re-driven by the executor that ran it
SETTLE_S = 60.0
TEMP_FILE_AGE_S = 3600.0


def maintenance_run_name() -> str:
    """Named by when it started, so that it stands apart from the recording runs in the UI."""
    return f"maintenance-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"


@flow(name="maintenance", flow_run_name=maintenance_run_name, persist_result=False, log_prints=False)
def maintenance() -> dict[str, Any]:
    """Re-drive what failed, then retention and compaction (see the module's docstring)."""
    settings = run_resources().settings
    return {
        "redrive": redrive_failed_runs(settings),
        "hourly_counts": write_hourly_counts(settings),
        "listener_health": write_listener_health(settings),
        "retention": apply_retention(settings),
        "reviews_ended": end_reviews_decided_elsewhere(),
    }


def end_reviews_decided_elsewhere() -> int:
    """One query (a page of waiting review runs); a failure waits for the next maintenance run."""
    try:
        with get_client(sync_client=True) as client:
            return len(end_decided_reviews(client, run_resources()))
    except Exception as exc:
        get_run_logger().warning("review runs of decided detections not ended yet (%s: %s)", type(exc).__name__, exc)
        return 0


@task(name="write hourly counts", cache_policy=NO_CACHE, persist_result=False)
def write_hourly_counts(settings: Settings) -> dict[str, int]:
    """Closed hours whose counts changed go to every sink. An hour a sink refuses stays due for the next run,
    and the rest of maintenance (retention above all) goes on: an InfluxDB outage must not fill the disk."""
    resources = run_resources()
    now = time.time()
    counts = {"hours_written": 0, "rows_written": 0, "hours_failed": 0}
    for hour, station_id, version in resources.species.hours_to_write(now, settings.detections.hourly_settle_s):
        table = resources.species.hour_table(hour, station_id)
        try:
            written = write_all(resources.sinks, table, kind="hourly")
        except Exception as exc:
            get_run_logger().warning(
                "hourly counts of %s not written yet (%s: %s)", table.column("time")[0], type(exc).__name__, exc
            )
            counts["hours_failed"] += 1
            continue
        resources.species.written(hour, station_id, version)
        counts["hours_written"] += 1
        counts["rows_written"] += max(written.values(), default=0)
    counts["hours_forgotten"] = resources.species.forget(now, max(settings.unattended.run_retention_days, 2.0) * DAY_S)
    return counts


@task(name="write listener health", cache_policy=NO_CACHE, persist_result=False)
def write_listener_health(settings: Settings) -> dict[str, int]:
    """The health reports the ingest spooled, as the table listener_health in every sink; the spool files go once
    all sinks took them (a refused batch waits for the next run, and maintenance goes on)."""
    resources = run_resources()
    files = closed_spool_files(settings.health_spool_dir, time.time())
    if not files:
        return {"reports": 0}
    table = health_table(read_spool(files), settings.station_id)
    try:
        write_all(resources.sinks, table, kind="health")
    except Exception as exc:
        get_run_logger().warning("listener health not written yet (%s: %s)", type(exc).__name__, exc)
        return {"reports": 0, "waiting": table.num_rows}
    if resources.outbox is not None:  # the station's own listeners only: the ingest keeps no made-up ids
        resources.outbox.put(health_messages(table.to_pylist(), topics_of(settings), resources.mqtt_state))
    for path in files:
        path.unlink(missing_ok=True)
    return {"reports": table.num_rows}


@task(name="re-drive failed runs", cache_policy=NO_CACHE, persist_result=False)
def redrive_failed_runs(settings: Settings) -> dict[str, int]:
    settled = datetime.now(timezone.utc) - timedelta(seconds=SETTLE_S)
    counts = {"redriven": 0, "given_up": 0}
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(f"process-recording/{settings.station_id}")
        failed = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.FAILED, StateType.CRASHED]))
            ),
            sort=FlowRunSort.EXPECTED_START_TIME_ASC,
            limit=SWEEP_BATCH,
        )
        for flow_run in failed:
            state = flow_run.state
            if state is None or state.name in GIVEN_UP or state.timestamp > settled:
                continue
            due = redrive_or_give_up(client, flow_run, state, settings)
            counts["redriven" if due else "given_up"] += 1
    return counts


def oldest_recording_run(settings: Settings) -> datetime | None:
    """When the oldest recording run the station still keeps started (None without any)."""
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(f"process-recording/{settings.station_id}")
        oldest = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
            flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(is_null_=False)),
            sort=FlowRunSort.START_TIME_ASC,
            limit=1,
        )
    return oldest[0].start_time if oldest else None


@task(name="apply retention", cache_policy=NO_CACHE, persist_result=False)
def apply_retention(settings: Settings) -> dict[str, int]:
    resources = run_resources()
    archive = metrics.count_purged(settings.station_id, archive_retention(settings, worth=resources.ledger.detections))
    journal = PurgeJournal(settings.purge_journal_file)
    announced = journal.take()  # this run's deletions and those the ingest made at the floor
    announce_purged(announced, settings.station_id)
    journal.taken()
    temporary = remove_stale_files(
        [settings.staging_dir, settings.local_archive_dir, settings.detections_dir], TEMP_FILE_AGE_S
    )
    # the state within the budget: cached results only while a run could still use them (retention, or the
    # oldest run the budget kept), the processed record within its share
    retention_s = settings.unattended.run_retention_days * DAY_S
    oldest = oldest_recording_run(settings)
    kept_s = (datetime.now(timezone.utc) - oldest).total_seconds() if oldest else retention_s
    results = ResultsDatabase(settings.results_file).prune(min(retention_s, kept_s))
    forgotten = resources.ledger.keep_within(int(settings.history_budget().budget_bytes * RECORD_SHARE))
    # what Prefect itself stores beside the runs (the exception of a failed run), gone with them
    results += remove_stale_files([settings.prefect_home / "storage"], retention_s, pattern="*").files
    compaction = compact_detections(settings.detections_dir)
    return {
        "archive_files_deleted": len(archive),
        "archive_bytes_deleted": sum(item.size for item in archive),
        "archive_deletions_announced": len(announced),
        "temporary_files_deleted": temporary.files,
        "cached_results_deleted": results,
        "processed_records_forgotten": forgotten,
        "detection_files_merged": compaction.files_merged,
    }
