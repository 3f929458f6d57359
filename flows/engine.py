"""Prefect's flow-run engine, run inside a long-lived process (the executor, the birdflow worker).

No process per run, so the BirdNET model stays loaded; the stock engine's per-run extras that cost more
than the run's own bookkeeping are left out (see InProcessFlowRunEngine and engine_context).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

from prefect import Flow
from prefect._flow_run_suspension import register_flow_run_suspension_request
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.objects import FlowRun, State
from prefect.context import SyncClientContext
from prefect.flow_engine import FlowRunEngine
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings


@contextmanager
def engine_context() -> Iterator[SyncPrefectClient]:
    """One API client for all the runs of a thread, and no heartbeat thread per run (~0.7 s each):
    a run left Running by a crashed process is taken over when the executor restarts."""
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
