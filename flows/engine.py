"""Prefect's flow-run engine, run inside a long-lived process (the executor, the birdflow worker).

No process per run, so the BirdNET model stays loaded; the stock engine's per-run extras that cost more
than the run's own bookkeeping are left out (see InProcessFlowRunEngine and engine_context).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prefect import Flow
from prefect._flow_run_suspension import register_flow_run_suspension_request
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.objects import FlowRun, State
from prefect.context import SyncClientContext
from prefect.exceptions import Pause
from prefect.flow_engine import FlowRunEngine
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

ROUTINE_LINES = ("Beginning flow run", "Finished in state Completed(", "Finished in state Cached(")
# a task's failed end, said again right after "Task run failed with exception: ... - Retries are exhausted"
REPEATED_LINES = ("Finished in state Failed('Task run encountered an exception",)
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
TRACEBACK_EVERY_S = 3600.0
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


def quiet_run_logs() -> None:
    """The filters above on the run loggers of this process (once)."""
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(existing, RoutineLinesFilter) for existing in logger.filters):
            logger.addFilter(RoutineLinesFilter())
            logger.addFilter(TracebackOncePerKind())


@contextmanager
def engine_context() -> Iterator[SyncPrefectClient]:
    """One API client for all the runs of a thread, and no heartbeat thread per run (~0.7 s each):
    a run left Running by a crashed process is taken over when the executor restarts."""
    quiet_run_logs()
    with (
        SyncClientContext.get_or_create() as context,
        temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}),
    ):
        yield context.client


class InProcessFlowRunEngine(FlowRunEngine):
    """Prefect's flow-run engine without the per-run suspension observer.

    For a deployment's run the stock engine starts a thread with its own event loop, API client and
    events websocket to notice a suspension requested from outside. Runs here are suspended only from
    inside (a review waiting for its verdict), and that watcher cost more than the rest of the run's
    bookkeeping together.
    """

    @contextmanager
    def setup_flow_run_suspension_request(self):
        request = self._get_flow_run_suspension_request()
        with register_flow_run_suspension_request(self.flow_run.id, request):
            yield request


def run_in_process(flow: Flow, flow_run: FlowRun) -> State | None:
    """What `prefect.flow_engine.run_flow` does for a sync flow, with the engine above; a run that suspends itself
    returns its Paused state."""
    engine = InProcessFlowRunEngine(flow=flow, parameters=flow_run.parameters, flow_run=flow_run)
    try:
        with engine.start():
            while engine.is_running():
                with engine.run_context():
                    engine.call_flow_fn()
    except Pause:
        pass  # suspended until resumed (a review waiting for its verdict): the server has it Paused, no thread waits
    return engine.state
