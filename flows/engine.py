"""Prefect's flow-run engine, run inside a long-lived process (the executor, the birdflow worker).

No process per run, so the BirdNET model stays loaded; the stock engine's per-run extras that cost more
than the run's own bookkeeping are left out (see InProcessFlowRunEngine and engine_context). A run this
process creates to execute at once is created Running (create_running): one API call where the stock engine
makes four (create, claim, read back, update), each 7-35 ms of the Prefect server's CPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from prefect import Flow
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.actions import DeploymentFlowRunCreate
from prefect.client.schemas.objects import FlowRun, State
from prefect.context import SyncClientContext
from prefect.exceptions import Pause
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings
from prefect.states import Running, to_state_create

from birdflow.flows.announce import ui_link
from birdflow.runtime.prefect_internals import (
    FlowRunEngine,
    register_flow_run_suspension_request,
    replace_task_state_emitter,
)

ROUTINE_LINES = ("Beginning flow run", "Finished in state Completed(", "Finished in state Cached(")
# a task's failed end, said again right after "Task run failed with exception: ... - Retries are exhausted"
REPEATED_LINES = ("Finished in state Failed('Task run encountered an exception",)
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
TRACEBACK_EVERY_S = 3600.0
REPEAT_EVERY_S = 300.0  # a failure that repeats: logged at most once in five minutes per kind, with its count
LONGEST_LINE = 400


class RoutineLinesFilter(logging.Filter):
    """Drops the engine's "Beginning flow run" and "Finished in state Completed()" lines, six per run:
    the run's states say the same, and they were ~15 % of what each run added to the Prefect database.
    Also a failed task's end, which repeats the line before it. Everything else is still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not (record.levelno == logging.INFO and message.startswith(ROUTINE_LINES)) and not message.startswith(
            REPEATED_LINES
        )


def one_line(text: str, limit: int = LONGEST_LINE) -> str:
    """Whitespace (line breaks included) collapsed, cut at `limit` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def failure_kind(error: BaseException) -> tuple[str, str, int]:
    """What makes two failures the same for a reader: the exception's type and where it was raised."""
    traceback, where = error.__traceback__, ("", 0)
    while traceback is not None:
        where = (traceback.tb_frame.f_code.co_filename, traceback.tb_lineno)
        traceback = traceback.tb_next
    return type(error).__qualname__, *where


class TracebackOncePerKind(logging.Filter):
    """A failed task's traceback once an hour per kind of failure; after that, its message on one line.

    The engine logs a task's last failed attempt with its whole traceback (50-130 lines through boto3 or
    influxdb3-python), to the console and into the run's logs in the database: during an S3 outage ~400
    lines per recording on the SD card that holds the database. A traceback says something new once."""

    def __init__(self, every_s: float = TRACEBACK_EVERY_S, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.every_s = every_s
        self.clock = clock
        self._shown: dict[tuple[str, str, int], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is None:
            return True
        kind, now = failure_kind(error), self.clock()
        if now - self._shown.get(kind, float("-inf")) >= self.every_s:
            if len(self._shown) >= 256:
                self._shown.clear()
            self._shown[kind] = now
            return True
        record.msg, record.args = one_line(record.getMessage()) + " (traceback shown earlier)", ()
        record.exc_info = record.exc_text = None
        return True


class RepeatsCounted(logging.Filter):
    """A failure that repeats (a damaged disk, a server gone) logged once per kind every `every_s`, the next time
    with how often it came in between: a scan that fails every second would otherwise fill the card it reports."""

    def __init__(self, every_s: float = REPEAT_EVERY_S, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.every_s = every_s
        self.clock = clock
        self._seen: dict[tuple[str, str, int], tuple[float, int]] = {}  # kind: (last logged, left out since)

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is None:
            return True
        kind, now = failure_kind(error), self.clock()
        logged, left_out = self._seen.get(kind, (float("-inf"), 0))
        if now - logged < self.every_s:
            self._seen[kind] = (logged, left_out + 1)
            return False
        if len(self._seen) >= 256:
            self._seen.clear()
        self._seen[kind] = (now, 0)
        if left_out:
            record.msg, record.args = f"{record.getMessage()} (and {left_out} like it since last shown)", ()
        return True


class RunLinkThroughLogin(logging.Filter):
    """The engine's "View at <run page>" line with the link a person can open (ui_link)."""

    def filter(self, record: logging.LogRecord) -> bool:
        settings = get_current_settings()
        if settings.ui_url and settings.api.auth_string:
            prefix, message = f"View at {settings.ui_url.rstrip('/')}", str(record.msg)
            if message.startswith(prefix + "/"):
                record.msg = f"View at {ui_link(message.removeprefix(prefix))}"
        return True


def quiet_run_logs() -> None:
    """The filters above on the run loggers of this process (once)."""
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(existing, RoutineLinesFilter) for existing in logger.filters):
            logger.addFilter(RoutineLinesFilter())
            logger.addFilter(TracebackOncePerKind())
            logger.addFilter(RunLinkThroughLogin())


def first_task_state_not_sent(emit: Callable[..., Any]) -> Callable[..., Any]:
    """`emit` (Prefect's emitter of task-run state events) without a task run's first event, its Pending state:
    the Running that follows a millisecond later creates the task run on the server as well (its recorder upserts
    task runs from any of their events). One event fewer per task run, ~2 ms of server CPU each."""

    def emit_after_pending(task_run, initial_state, validated_state, follows=None):
        if initial_state is None and validated_state.is_pending():
            return None  # and the Running event, following nothing sent, carries no `follows`
        return emit(task_run=task_run, initial_state=initial_state, validated_state=validated_state, follows=follows)

    return emit_after_pending


@contextmanager
def engine_context() -> Iterator[SyncPrefectClient]:
    """One API client for all the runs of a thread, and no heartbeat thread per run (~0.7 s each):
    a run left Running by a crashed process is taken over when the executor restarts."""
    quiet_run_logs()
    replace_task_state_emitter(first_task_state_not_sent)
    with (
        SyncClientContext.get_or_create() as context,
        temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}),
    ):
        yield context.client


def create_running(
    client: SyncPrefectClient,
    deployment_id: UUID,
    parameters: dict[str, Any],
    name: str,
    tags: list[str],
    idempotency_key: str,
) -> tuple[FlowRun, bool]:
    """(the run, whether this call created it): a run of the deployment created already Running, for this process
    to execute at once (run_in_process with created_running). Idempotent on the key: a run that exists is
    returned as it is, in its own state. The parameters are birdflow's own (RecordingInfo), so the server's
    check of them against the deployment's schema is left to runs people start."""
    body = DeploymentFlowRunCreate(
        parameters=parameters,
        name=name,
        tags=tags,
        idempotency_key=idempotency_key,
        state=to_state_create(Running()),
        enforce_parameter_schema=False,
    )
    response = client.request(
        "POST",
        "/deployments/{id}/create_flow_run",
        path_params={"id": deployment_id},
        json=body.model_dump(mode="json", exclude_unset=True),
    )
    return FlowRun.model_validate(response.json()), response.status_code == 201  # 200: it existed


@contextmanager
def answered_here(**answers: Callable[..., Any]) -> Iterator[None]:
    """For the duration, this thread's API client answers these calls itself (instance attributes shadow its
    methods). Every flow-run thread has a client of its own (engine_context), so no other run sees them."""
    context = SyncClientContext.get()
    if context is None:
        yield
        return
    for name, answer in answers.items():
        setattr(context.client, name, answer)
    try:
        yield
    finally:
        for name in answers:
            delattr(context.client, name)


def _nothing_to_update(*args: Any, **kwargs: Any) -> None:
    return None


@dataclass
class InProcessFlowRunEngine(FlowRunEngine):
    """Prefect's flow-run engine without the per-run suspension observer, and without the calls it does not need
    for a run created Running (create_running).

    For a deployment's run the stock engine starts a thread with its own event loop, API client and
    events websocket to notice a suspension requested from outside. Runs here are suspended only from
    inside (a review waiting for its verdict), and that watcher cost more than the rest of the run's
    bookkeeping together.

    For a run created Running, the engine has the server's answer already: its claim (proposing Running), its
    read of the run back and its update of the run's retry policy (the flow has no retries of its own: a failed
    run is re-driven, flows/redrive.py) are left out.
    """

    created_running: bool = False

    @contextmanager
    def setup_flow_run_suspension_request(self):
        """Prefect's own setup (a suspension requested before the run starts still stops it), without the
        observer it starts for a deployment's run."""
        if not self.flow_run:
            raise ValueError("Flow run not set")
        request = self._get_flow_run_suspension_request()
        with register_flow_run_suspension_request(self.flow_run.id, request):
            request.raise_if_requested()
            yield request

    @contextmanager
    def initialize_run(self):
        if not self.created_running:
            with super().initialize_run():
                yield self
            return
        with ExitStack() as run:
            with answered_here(update_flow_run=_nothing_to_update):
                run.enter_context(super().initialize_run())
            yield self

    @contextmanager
    def setup_run_context(self, client: SyncPrefectClient | None = None):
        if not self.created_running:
            with super().setup_run_context(client):
                yield
            return
        known = self.flow_run
        with ExitStack() as run:
            with answered_here(read_flow_run=lambda flow_run_id: known):
                run.enter_context(super().setup_run_context(client))
            yield

    def set_state(self, state: State, force: bool = False) -> State:
        if self.created_running and state.is_running() and self.state.is_running():
            return self.state  # created Running: claimed in the same call
        return super().set_state(state, force)


def run_in_process(flow: Flow, flow_run: FlowRun, created_running: bool = False) -> State | None:
    """What `prefect.flow_engine.run_flow` does for a sync flow, with the engine above; a run that suspends itself
    returns its Paused state. `created_running`: the run was just created Running by create_running."""
    engine = InProcessFlowRunEngine(
        flow=flow, parameters=flow_run.parameters, flow_run=flow_run, created_running=created_running
    )
    try:
        with engine.start():
            while engine.is_running():
                with engine.run_context():
                    engine.call_flow_fn()
    except Pause:
        pass  # suspended until resumed (a review waiting for its verdict): the server has it Paused, no thread waits
    return engine.state
