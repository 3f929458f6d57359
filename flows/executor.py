"""The long-lived process that executes process_recording flow runs in-process, with the model warm.

Every recording gets a flow run created from the station's deployment (idempotent on the recording id),
claimed and executed here with `prefect.flow_engine.run_flow`: no process per run, no model reload.
Runs that the Prefect UI schedules (retry, rerun, quick run) are picked up by polling the deployment.
On start, recordings already in the folder without a finished run get one, so a crash between
"file written" and "run created" loses nothing.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterNextScheduledStartTime,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.deployments.runner import EntrypointType
from prefect.exceptions import Abort
from prefect.flow_engine import run_flow
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from prefect.states import Pending, Scheduled
from prefect.utilities.engine import propose_state_sync

from birdflow import metrics
from birdflow.recordings import (
    RecordingInfo,
    RecordingStore,
    load_info,
    parse_file_name,
    recording_id_for,
    remove_recording,
    sha256_file,
)
from birdflow.settings import Settings
from flows.process_recording import process_recording
from flows.runtime import use_settings

log = logging.getLogger("birdflow.executor")
UNFINISHED = {StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED}


def deployment_name(settings: Settings) -> str:
    return settings.station_id


def ensure_deployment(settings: Settings) -> UUID:
    """The station's process-recording deployment (created or updated); its runs execute here."""
    deployment = process_recording.to_deployment(
        name=deployment_name(settings),
        tags=["birdflow", settings.station_id],
        description=f"Recordings of station {settings.station_id}, executed in-process by `birdflow execute`.",
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    return deployment.apply()


def info_for_dropped_file(path: Path, settings: Settings) -> RecordingInfo:
    """Metadata for an audio file placed in the recordings folder without a sidecar (copied in by hand)."""
    import soundfile

    details = soundfile.info(str(path))
    listener, start = parse_file_name(path.name)
    start = start or datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
    content_hash = sha256_file(path)
    recording_id = recording_id_for(listener or "unknown", start, content_hash)
    info = RecordingInfo(
        recording_id=recording_id,
        listener_id=listener or "unknown",
        station_id=settings.station_id,
        start_time=start,
        duration_s=details.duration,
        sample_rate=details.samplerate,
        channels=details.channels,
        content_hash=content_hash,
        size_bytes=path.stat().st_size,
        file_name=recording_id + path.suffix.lower(),
        source="folder",
    )
    renamed = path.with_name(info.file_name)
    renamed.with_suffix(".json").write_text(info.model_dump_json())
    path.rename(renamed)
    return info


class Executor:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = RecordingStore(settings.partial_dir, settings.recordings_dir, settings.station_id)
        self.pipeline = use_settings(settings)
        self.deployment_id: Optional[UUID] = None
        # recordings whose run ended Failed/Crashed: left for a retry from the UI or a backfill
        self._parked: set[str] = set()

    def start(self) -> None:
        """Register the deployment and warm the model before the first recording arrives."""
        self.deployment_id = ensure_deployment(self.settings)
        _ = self.pipeline.model, self.pipeline.sinks, self.pipeline.archive
        log.info("executor ready: deployment %s, BirdNET on %s", self.deployment_id, self.pipeline.model.backend)

    def run_forever(self, stop: threading.Event) -> None:
        self.start()
        with get_client(sync_client=True) as client:
            while not stop.is_set():
                worked = self.run_new_recordings(client, stop)
                worked = self.run_scheduled(client, stop) or worked
                if not worked:
                    stop.wait(self.settings.poll_interval_s)

    def run_new_recordings(self, client: SyncPrefectClient, stop: threading.Event) -> bool:
        pending = [path for path in self.store.pending() if path.stem not in self._parked]
        metrics.BACKLOG.labels(self.settings.station_id).set(len(pending))
        for path in pending:
            if stop.is_set():
                break
            self.run_recording(client, path)
        return bool(pending)

    def run_recording(self, client: SyncPrefectClient, path: Path) -> Optional[FlowRun]:
        info = load_info(path) or info_for_dropped_file(path, self.settings)
        flow_run = client.create_flow_run_from_deployment(
            self.deployment_id,
            parameters={"recording": info.model_dump(mode="json")},
            name=info.run_name,
            tags=[info.listener_id, info.source],
            idempotency_key=info.recording_id,
        )
        state = flow_run.state.type if flow_run.state else StateType.SCHEDULED
        if state == StateType.COMPLETED:
            # the same content was sent again after it had been processed: nothing to do
            remove_recording(self.settings.recordings_dir / info.file_name)
            return flow_run
        if state not in UNFINISHED:
            self._parked.add(info.recording_id)
            return flow_run
        if state == StateType.SCHEDULED:
            metrics.FLOW_RUNS_TRIGGERED.labels(self.settings.station_id).inc()
        else:
            # left Pending/Running by an executor that stopped mid-run: take it over
            client.set_flow_run_state(flow_run.id, Scheduled(), force=True)
        self.execute(client, flow_run)
        return flow_run

    def run_scheduled(self, client: SyncPrefectClient, stop: threading.Event) -> bool:
        """Runs scheduled from the UI or API (retries, reruns, quick runs) that are due now."""
        due = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[self.deployment_id])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
                next_scheduled_start_time=FlowRunFilterNextScheduledStartTime(before_=datetime.now(timezone.utc)),
            ),
            sort=FlowRunSort.NEXT_SCHEDULED_START_TIME_ASC,
            limit=20,
        )
        for flow_run in due:
            if stop.is_set():
                break
            recording = flow_run.parameters.get("recording", {})
            self._parked.discard(recording.get("recording_id", ""))
            self.execute(client, flow_run)
        return bool(due)

    def execute(self, client: SyncPrefectClient, flow_run: FlowRun) -> None:
        try:
            state = propose_state_sync(client, Pending(), flow_run_id=flow_run.id)
        except Abort as exc:
            log.info("flow run %s was claimed elsewhere: %s", flow_run.name, exc)
            return
        if not state.is_pending():
            return
        # The heartbeat thread costs ~0.7 s per run; a crashed executor is recovered on restart instead.
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            final = run_flow(process_recording, flow_run=flow_run, parameters=flow_run.parameters, return_type="state")
        outcome = final.type.value.lower() if final is not None else "crashed"
        metrics.FLOW_RUNS_FINISHED.labels(self.settings.station_id, outcome).inc()
        if final is None or not final.is_completed():
            recording = flow_run.parameters.get("recording", {})
            self._parked.add(recording.get("recording_id", ""))
            log.warning("flow run %s ended %s", flow_run.name, outcome)
