"""The `birdflow` Prefect worker type: runs a work pool's flow runs inside the worker process.

`prefect worker start --type birdflow --pool <station pool>` on a Pi. A stock process worker starts a
Python process per run (3-6 s, the model reloaded each time); this one executes each run with Prefect's
flow-run engine on one of its own threads, so the BirdNET interpreter of that thread stays loaded.
Registered through the `prefect.collections` entry point, so Prefect's CLI finds the type.
"""

from __future__ import annotations

import asyncio
import importlib
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from functools import lru_cache
from typing import Any

import anyio.abc
from prefect import Flow
from prefect.client.schemas.objects import FlowRun
from prefect.states import Failed
from prefect.workers.base import BaseJobConfiguration, BaseVariables, BaseWorker, BaseWorkerResult

from flows.engine import engine_context, run_in_process

DEFAULT_THREADS = 4


class BirdflowWorkerResult(BaseWorkerResult):
    """Exit status of an in-process run: 0 when it completed."""


# the modules whose flows birdflow deploys (prefect.yaml, deployments/registration.py): the only code a worker runs
OWN_FLOW_MODULES = frozenset(
    {"flows.process_recording", "flows.backfill", "flows.maintenance", "flows.export", "flows.review"}
)


class NotOurFlow(ValueError):
    """A deployment in the pool names an entrypoint that is not one of birdflow's flows."""


@lru_cache(maxsize=16)
def flow_for(entrypoint: str) -> Flow:
    """Each deployment's flow, imported once per worker process.

    prefect.yaml names files (flows/process_recording.py:process_recording), the station's own deployments
    module paths (flows.process_recording.process_recording); both are modules of the installed birdflow
    package, imported as such: the same module objects (and the same loaded model) for every run. Nothing
    else is loaded: whoever may create deployments in the pool cannot make every Pi import a file of theirs.
    """
    if ":" in entrypoint:
        path, _, name = entrypoint.rpartition(":")
        module_name = path.removesuffix(".py").replace("/", ".")
    else:
        module_name, _, name = entrypoint.rpartition(".")
    if module_name not in OWN_FLOW_MODULES:
        raise NotOurFlow(
            f"entrypoint {entrypoint!r} is not one of birdflow's flows ({', '.join(sorted(OWN_FLOW_MODULES))})"
        )
    flow = getattr(importlib.import_module(module_name), name, None)
    if not isinstance(flow, Flow):
        raise NotOurFlow(f"entrypoint {entrypoint!r} names no flow of {module_name}")
    return flow


class BirdflowWorker(BaseWorker[BaseJobConfiguration, BaseVariables, BirdflowWorkerResult]):
    type = "birdflow"
    job_configuration = BaseJobConfiguration
    job_configuration_variables = BaseVariables
    _description = "Runs flow runs inside the worker process, keeping the BirdNET model loaded between runs."
    _display_name = "birdflow (in-process)"
    _documentation_url = "https://prefect.io"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        threads = kwargs.get("limit") or DEFAULT_THREADS
        self._per_thread = threading.local()
        # long-lived threads: each keeps its API client; all share the process's one BirdNET (flows.run_resources)
        self._threads = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="birdflow-run")

    async def run(
        self,
        flow_run: FlowRun,
        configuration: BaseJobConfiguration,
        task_status: anyio.abc.TaskStatus[Any] | None = None,
    ) -> BirdflowWorkerResult:
        if task_status is not None:
            task_status.started(str(flow_run.id))
        assert flow_run.deployment_id is not None, "a worker is handed runs of deployments only"
        deployment = await self.client.read_deployment(flow_run.deployment_id)
        try:
            flow = flow_for(deployment.entrypoint or "")
        except NotOurFlow as exc:
            self._logger.error("flow run %s refused: %s", flow_run.name, exc)
            await self.client.set_flow_run_state(
                flow_run.id, Failed(message=f"refused by the birdflow worker: {exc}"), force=True
            )
            return BirdflowWorkerResult(identifier=str(flow_run.id), status_code=1)
        state = await asyncio.wrap_future(self._threads.submit(self._execute, flow, flow_run))
        return BirdflowWorkerResult(
            identifier=str(flow_run.id), status_code=0 if state is not None and state.is_completed() else 1
        )

    def _execute(self, flow: Flow, flow_run: FlowRun):
        """Runs on one of the worker's threads. The engine context (its API client) is entered by a thread's
        first run and kept for all later ones: a client per run would spend much of a run's bookkeeping on
        TLS set-up. Should the API be unreachable then, only that run fails; the next one tries again."""
        if getattr(self._per_thread, "engine", None) is None:
            engine = ExitStack()
            engine.enter_context(engine_context())
            self._per_thread.engine = engine
        return run_in_process(flow, flow_run)

    async def __aexit__(self, *exc_info):
        self._threads.shutdown(wait=False, cancel_futures=True)
        return await super().__aexit__(*exc_info)
