"""The long-lived process that executes process_recording flow runs in-process, with the model warm.

Every recording gets a flow run created from the station's deployment (idempotent on the recording id),
claimed and executed here by Prefect's flow-run engine (flows/engine.py): no process per run, no model reload.
Runs that are scheduled (UI retries and reruns, re-drives, the maintenance deployment's schedule) are
picked up by polling the deployments. On start, recordings already in the folder without a finished run
get one, so a crash between "file written" and "run created" loses nothing. A run that fails is re-driven
later (flows/redrive.py); a recording already processed (the ledger says so) is not processed again, and a run
the server still shows Running after its recording was processed (the server away as it ended) is set Completed.
"""

from __future__ import annotations

import functools
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import httpx
import soundfile
from prefect import Flow
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterNextScheduledStartTime,
    FlowRunFilterStartTime,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, State, StateType
from prefect.client.schemas.responses import OrchestrationResult, SetStateStatus
from prefect.client.schemas.sorting import FlowRunSort
from prefect.context import SettingsContext, get_settings_context
from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, get_current_settings
from prefect.settings import Settings as PrefectSettings
from prefect.states import Completed, Crashed, Pending, Scheduled
from pydantic import ValidationError

from birdflow.core.errors import BirdflowError, StateFileDamaged
from birdflow.core.recordings import (
    RecordingInfo,
    RecordingStore,
    describe_audio_file,
    load_info,
    remove_recording,
)
from birdflow.flows.engine import RepeatsCounted, create_running, engine_context, run_in_process
from birdflow.flows.maintenance import maintenance
from birdflow.flows.process_recording import process_recording
from birdflow.flows.redrive import redrive_or_give_up
from birdflow.flows.review import review_detection
from birdflow.flows.run_resources import use_run_resources
from birdflow.runtime import metrics
from birdflow.runtime.folder_watch import FolderWatch
from birdflow.runtime.mqtt import Publisher
from birdflow.settings import Settings

log = logging.getLogger("birdflow.executor")
log.addFilter(RepeatsCounted())
T = TypeVar("T")
# a recording's run still Running this long after it started, its recording processed and gone from the folder,
# ended without saying so (the Prefect server away at its end); looked for every LEFT_RUNNING_CHECK_S
LEFT_RUNNING_AFTER = timedelta(minutes=2)
LEFT_RUNNING_CHECK_S = 60.0
EXECUTOR_LOCK = "executor.lock"  # under data_dir: one executor per station (birdflow.app.single)


def info_for_dropped_file(path: Path, settings: Settings) -> RecordingInfo | None:
    """Metadata for an audio file placed in the recordings folder without a sidecar (copied in by hand);
    None, and the file set aside in the failed folder, when it is not audio."""
    try:
        info = describe_audio_file(path, settings.station_id, "folder")
    except (soundfile.LibsndfileError, RuntimeError) as exc:
        settings.failed_dir.mkdir(parents=True, exist_ok=True)
        path.replace(settings.failed_dir / path.name)
        metrics.RECORDINGS_GIVEN_UP.labels(settings.station_id, "unreadable").inc()
        log.warning("%s is not readable audio (%s); set aside in %s", path.name, exc, settings.failed_dir)
        return None
    renamed = path.with_name(info.file_name)
    renamed.with_suffix(".json").write_text(info.model_dump_json())
    path.rename(renamed)
    return info


@functools.cache
def settings_without_client_retries() -> PrefectSettings:
    """This process's Prefect settings with the client's own retries off, built once: building them per
    call was ~12 % of the executor's CPU under a backlog (pydantic-settings reads the environment and files)."""
    return get_current_settings().copy_with_update(updates={PREFECT_CLIENT_MAX_RETRIES: 0})


def create_with_quick_retries(create: Callable[[], T], attempts: int = 8) -> T:
    """Create a flow run, retrying "database is locked" (503) after tens of milliseconds.

    A Prefect server on SQLite other than birdflow's own (birdflow.app.prefect_server) reads before it
    writes here, so it loses to concurrent writers and answers 503; the Prefect client would wait 2 s,
    4 s ... before retrying. Idempotent on the recording id, so a retry never creates a second run.
    """
    for attempt in range(attempts):
        try:
            with SettingsContext(profile=get_settings_context().profile, settings=settings_without_client_retries()):
                return create()
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != 503 or attempt == attempts - 1:
                raise
            time.sleep(0.03 * 2**attempt * random.uniform(0.5, 1.5))
    raise AssertionError("unreachable")


def work_key(item) -> str:
    """One key per recording, whether the scan found its file (named by its recording id) or the server its
    run (a re-drive, a rerun): the same recording is never queued twice, so never run twice at once. Runs of
    no recording (maintenance) go by their id."""
    if isinstance(item, Path):
        return item.stem
    return (item.parameters.get("recording") or {}).get("recording_id") or str(item.id)


class ExecutorFailed(BirdflowError):
    """A flow-run thread could not start or died: the executor stops rather than leave recordings waiting."""


@dataclass(frozen=True)
class StationDeployments:
    """The station's deployments on the Prefect server (deployments.registration creates them)."""

    recordings: UUID
    maintenance: UUID
    reviews: UUID


class Executor:
    """Scans for recordings and due runs; `workers` threads execute them, each with its own model."""

    def __init__(self, settings: Settings, deployments: StationDeployments):
        self.settings = settings
        self.store = RecordingStore(settings.partial_dir, settings.recordings_dir, settings.station_id)
        self.resources = use_run_resources(settings)
        self.flows: dict[UUID, Flow] = {}  # deployment id -> the flow its runs execute
        self.deployment_id = deployments.recordings
        self.maintenance_id = deployments.maintenance
        self.reviews_id = deployments.reviews
        # recordings whose run is not this scan's to start: scheduled for a re-drive, or being handled
        self._parked: set[str] = set()
        self._queue: queue.Queue = queue.Queue()
        # what is queued or running, by work_key: a recording is one key whether its file or its run was found
        self._in_flight: set[str] = set()
        self._lock = threading.Lock()
        self._maintenance_slot = -1  # the maintenance interval that has its run

    def start(self) -> None:
        """Open the sinks and archive before the first recording arrives."""
        self.settings.recordings_dir.mkdir(parents=True, exist_ok=True)
        # the flows carry the station's result storage: without one, each run asks the server for its
        # default storage (an API call per run; the runs themselves persist no flow result)
        storage = self.resources.result_storage
        self.flows = {
            self.deployment_id: process_recording.with_options(result_storage=storage),
            self.maintenance_id: maintenance.with_options(result_storage=storage),
            self.reviews_id: review_detection.with_options(result_storage=storage),
        }
        _ = self.resources.sinks, self.resources.archive
        self.resources.check_state_files()

    def run_forever(self, stop: threading.Event) -> None:
        """Until `stop` is set. Raises ExecutorFailed when a flow-run thread cannot start or dies: the
        process then exits and its supervisor restarts it, instead of leaving recordings unprocessed."""
        self.start()
        ready = threading.Barrier(self.settings.executor_threads + 1)
        workers = [
            threading.Thread(target=self._work, args=(stop, ready), name=f"flow-runs-{number}", daemon=True)
            for number in range(self.settings.executor_threads)
        ]
        for worker in workers:
            worker.start()
        if self.settings.mqtt.mqtt_host:
            publisher = Publisher(self.settings)
            threading.Thread(target=publisher.run, args=(stop,), name="mqtt", daemon=True).start()
        watch = FolderWatch(self.settings.recordings_dir)
        try:
            try:
                ready.wait()
            except threading.BrokenBarrierError:
                raise ExecutorFailed("a flow-run thread could not start (see the error above)") from None
            log.info(
                "executor ready: deployment %s, %d worker(s), BirdNET on %s with %d interpreter(s)",
                self.deployment_id,
                len(workers),
                self.resources.model.backend,
                self.settings.analysis.interpreters,
            )
            interval = self.settings.prefect.poll_interval_s
            looked_up = left_running_checked = float("-inf")
            with engine_context() as client:
                while not stop.is_set():
                    if not all(worker.is_alive() for worker in workers):
                        raise ExecutorFailed("a flow-run thread died (see the error above)")
                    self.queue_new_recordings()
                    # a new file wakes this loop; the server is asked for due runs once per interval only
                    if time.monotonic() - looked_up >= interval:
                        looked_up = time.monotonic()
                        self.schedule_maintenance(client)
                        self.queue_scheduled(client)
                    if time.monotonic() - left_running_checked >= LEFT_RUNNING_CHECK_S:
                        left_running_checked = time.monotonic()
                        self.complete_runs_left_running(client)
                    watch.wait(max(0.0, looked_up + interval - time.monotonic()))
        finally:
            watch.close()
            for _ in workers:
                self._queue.put(None)
            for worker in workers:
                worker.join(timeout=60)

    def _work(self, stop: threading.Event, ready: threading.Barrier) -> None:
        """One flow-run thread: its own API client, and the shared BirdNET loaded before it says ready."""
        try:
            _ = self.resources.model
            with engine_context() as client:
                ready.wait()
                self._run_queue(stop, client)
        except threading.BrokenBarrierError:
            return  # another thread could not start; the executor is stopping
        except Exception:
            log.exception("flow-run thread %s stopped", threading.current_thread().name)
            ready.abort()

    def _run_queue(self, stop: threading.Event, client: SyncPrefectClient) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            key = work_key(item)
            try:
                if not stop.is_set():
                    if isinstance(item, Path):
                        self.run_recording(client, item)
                    else:
                        self.execute(client, item)
            except StateFileDamaged as damaged:  # said already where it was found; the retry finds the file whole
                log.warning("could not run %s (%s); it is retried on the next scan", key, damaged)
            except Exception:
                log.exception("could not run %s; it is retried on the next scan", key)
            finally:
                with self._lock:
                    self._in_flight.discard(key)

    def _enqueue(self, item) -> None:
        key = work_key(item)
        with self._lock:
            if key in self._in_flight:
                return
            self._in_flight.add(key)
        self._queue.put(item)

    def queue_new_recordings(self) -> None:
        pending = self.store.pending()
        waiting = [path for path in pending if path.stem in self._parked]
        metrics.BACKLOG.labels(self.settings.station_id).set(len(pending) - len(waiting))
        metrics.REDRIVE_WAITING.labels(self.settings.station_id).set(len(waiting))
        for path in pending:
            if path.stem not in self._parked:
                self._enqueue(path)

    def run_recording(self, client: SyncPrefectClient, path: Path) -> FlowRun | None:
        if not path.exists():
            return None  # finished by a run that was queued before this scan saw the file
        info = load_info(path) or info_for_dropped_file(path, self.settings)
        if info is None:
            return None
        if self.resources.ledger.contains(info.recording_id, self.resources.params.analysis_id):
            # the same recording was sent again after it had been processed (its run may be long deleted)
            remove_recording(self.settings.recordings_dir / info.file_name)
            metrics.RECORDINGS_DISCARDED.labels(self.settings.station_id, "already_processed").inc()
            return None
        # created already Running: this process claims it in the same call
        flow_run, created = create_with_quick_retries(
            lambda: create_running(
                client,
                self.deployment_id,
                parameters={"recording": info.model_dump(mode="json")},
                name=info.run_name,
                tags=[info.listener_id, info.source],
                idempotency_key=info.recording_id,
            )
        )
        state = flow_run.state or Scheduled()
        if created:
            metrics.FLOW_RUNS_TRIGGERED.labels(self.settings.station_id).inc()
            self.finish(
                client, flow_run, run_in_process(self.flows[self.deployment_id], flow_run, created_running=True)
            )
        elif state.is_completed():
            remove_recording(self.settings.recordings_dir / info.file_name)  # processed before; nothing to do
        elif state.is_scheduled():
            self._parked.add(info.recording_id)  # a re-drive, or a rerun: queue_scheduled runs it when due
        elif state.is_final():
            self.after_failure(client, flow_run, state)  # failed while no executor could re-drive it
        else:
            # left Pending/Running by an executor that stopped mid-run: that attempt crashed (its history says so,
            # and that it did not run twice at once); this one takes it over
            client.set_flow_run_state(
                flow_run.id, Crashed(message="its executor stopped mid-run; taken over"), force=True
            )
            client.set_flow_run_state(flow_run.id, Scheduled(), force=True)
            self.execute(client, flow_run)
        return flow_run

    def schedule_maintenance(self, client: SyncPrefectClient) -> None:
        """A maintenance run per maintenance_interval_s, due now; one per interval however often this
        restarts (idempotent on the interval), and none piled up while the executor was down."""
        interval = self.settings.unattended.maintenance_interval_s
        slot = int(time.time() // interval)
        if slot == self._maintenance_slot:
            return
        client.create_flow_run_from_deployment(
            self.maintenance_id, idempotency_key=f"maintenance-{slot}", state=Scheduled(), tags=["maintenance"]
        )
        self._maintenance_slot = slot

    def queue_scheduled(self, client: SyncPrefectClient) -> None:
        """Runs of the station's deployments that are due: UI retries and reruns, re-drives, maintenance, reviews
        (opened, or resumed with a verdict)."""
        due = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=list(self.flows))),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
                next_scheduled_start_time=FlowRunFilterNextScheduledStartTime(before_=datetime.now(timezone.utc)),
            ),
            sort=FlowRunSort.NEXT_SCHEDULED_START_TIME_ASC,
            limit=20,
        )
        for flow_run in due:
            recording = flow_run.parameters.get("recording") or {}
            self._parked.discard(recording.get("recording_id", ""))
            self._enqueue(flow_run)

    def complete_runs_left_running(self, client: SyncPrefectClient, older_than: timedelta = LEFT_RUNNING_AFTER) -> int:
        """Set Completed the recordings' runs the server still shows Running although their recording was processed
        (the processed record says so) and is gone from the folder: the engine could not report the end (the
        server away at that moment), and with the file gone no scan takes the run over. Returns how many."""
        left = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[self.deployment_id])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING])),
                start_time=FlowRunFilterStartTime(before_=datetime.now(timezone.utc) - older_than),
            ),
            limit=50,
        )
        completed = 0
        for flow_run in left:
            try:
                info = RecordingInfo.model_validate(flow_run.parameters.get("recording") or {})
            except ValidationError:
                continue  # no recording: its run fails as unprocessable when it is run
            with self._lock:
                busy = info.recording_id in self._in_flight
            processed = self.resources.ledger.contains(info.recording_id, self.resources.params.analysis_id)
            if busy or not processed or (self.settings.recordings_dir / info.file_name).exists():
                continue
            client.set_flow_run_state(
                flow_run.id,
                Completed(message="its recording was processed; the run could not say so then (Prefect was away)"),
                force=True,
            )
            log.info("flow run %s was left Running although its recording was processed: set Completed", flow_run.name)
            completed += 1
        return completed

    def flow_of(self, flow_run: FlowRun) -> Flow:
        """The flow a run of one of the station's deployments executes (the scan finds no other runs)."""
        if flow_run.deployment_id not in self.flows:
            raise ExecutorFailed(f"flow run {flow_run.name} is of no deployment of this station")
        return self.flows[flow_run.deployment_id]

    def execute(self, client: SyncPrefectClient, flow_run: FlowRun) -> None:
        """Claim a Scheduled run (Pending) and run it here."""
        claim: OrchestrationResult[Any] = client.set_flow_run_state(flow_run.id, Pending())
        if claim.status != SetStateStatus.ACCEPT:  # another process claimed it, or the server moved it on
            log.info("flow run %s was not claimed: %s", flow_run.name, getattr(claim.details, "reason", claim.status))
            return
        self.finish(client, flow_run, run_in_process(self.flow_of(flow_run), flow_run))

    def finish(self, client: SyncPrefectClient, flow_run: FlowRun, final: State | None) -> None:
        """Count a recording's run, and re-drive or give up what failed (a maintenance run's state is its own)."""
        if flow_run.deployment_id != self.deployment_id:
            return
        outcome = final.type.value.lower() if final is not None else "crashed"
        metrics.FLOW_RUNS_FINISHED.labels(self.settings.station_id, outcome).inc()
        if final is not None and final.is_completed():
            return
        latest = client.read_flow_run(flow_run.id)  # its run_count and state as the server has them
        if latest.state is not None and latest.state.is_final():
            self.after_failure(client, latest, latest.state)
        # else the engine could not report its end: the run is taken over at the next scan

    def after_failure(self, client: SyncPrefectClient, flow_run: FlowRun, state: State) -> None:
        """Re-drive it later (its recording waits, parked), or give it up (its audio goes to the failed folder)."""
        if redrive_or_give_up(client, flow_run, state, self.settings) is not None:
            self._parked.add((flow_run.parameters.get("recording") or {}).get("recording_id", ""))
