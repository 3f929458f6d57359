"""Prefect's flow-run engine, run inside a long-lived process (the executor, the birdflow worker).

No process per run, so the BirdNET model stays loaded; the stock engine's per-run extras that cost more
than the run's own bookkeeping are left out (see InProcessFlowRunEngine and engine_context).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator, Optional

from prefect import Flow
from prefect._flow_run_suspension import register_flow_run_suspension_request
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.objects import FlowRun, State
from prefect.context import SyncClientContext
from prefect.flow_engine import FlowRunEngine
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings


ROUTINE_LINES = ("Beginning flow run", "Finished in state Completed(", "Finished in state Cached(")


class RoutineLinesFilter(logging.Filter):
    """Drops the engine's "Beginning flow run" and "Finished in state Completed()" lines, six per run:
    the run's states say the same, and they were ~15 % of what each run added to the Prefect database.
    Failures, retries and everything else are still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.INFO and str(record.msg).startswith(ROUTINE_LINES))


def quiet_routine_lines() -> None:
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(existing, RoutineLinesFilter) for existing in logger.filters):
            logger.addFilter(RoutineLinesFilter())


@contextmanager
def engine_context() -> Iterator[SyncPrefectClient]:
    """One API client for all the runs of a thread, and no heartbeat thread per run (~0.7 s each):
    a run left Running by a crashed process is taken over when the executor restarts."""
    quiet_routine_lines()
    with SyncClientContext.get_or_create() as context, temporary_settings(
        updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
    ):
        yield context.client


class InProcessFlowRunEngine(FlowRunEngine):
    """Prefect's flow-run engine without the per-run suspension observer.

    For a deployment's run the stock engine starts a thread with its own event loop, API client and
    events websocket to notice a suspension requested from outside. Recordings' runs are never
    suspended, and that watcher cost more than the rest of the run's bookkeeping together.
    """

    @contextmanager
    def setup_flow_run_suspension_request(self):
        request = self._get_flow_run_suspension_request()
        with register_flow_run_suspension_request(self.flow_run.id, request):
            yield request


def run_in_process(flow: Flow, flow_run: FlowRun) -> Optional[State]:
    """What `prefect.flow_engine.run_flow` does for a sync flow, with the engine above."""
    engine = InProcessFlowRunEngine(flow=flow, parameters=flow_run.parameters, flow_run=flow_run)
    with engine.start():
        while engine.is_running():
            with engine.run_context():
                engine.call_flow_fn()
    return engine.state
