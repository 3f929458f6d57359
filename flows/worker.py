"""The `birdflow` Prefect worker type: runs a work pool's flow runs inside the worker process.

`birdflow worker` on a Pi (serve() on the station's pool). A stock process worker
starts a Python process per run (3-6 s, the model reloaded each time); this one executes each run with Prefect's
flow-run engine on one of its own threads, so the BirdNET interpreter of that thread stays loaded. Registered
through the `prefect.collections` entry point, so `prefect worker start --type birdflow` finds the type too.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import queue
import signal
import threading
import time
from concurrent.futures import Future, TimeoutError
from contextlib import ExitStack
from functools import lru_cache
from typing import Any

import anyio.abc
from prefect import Flow, get_client
from prefect.client.schemas.objects import FlowRun
from prefect.states import Crashed, Failed
from prefect.workers.base import BaseJobConfiguration, BaseVariables, BaseWorker, BaseWorkerResult

from birdflow.core.errors import Refused
from birdflow.flows.engine import engine_context, run_in_process
from birdflow.flows.run_resources import run_resources
from birdflow.runtime.mqtt import Publisher

STOP_GRACE_S = 20.0  # within the 30 s the compose files give a container to stop
log = logging.getLogger("birdflow.worker")


class BirdflowWorkerResult(BaseWorkerResult):
    """Exit status of an in-process run: 0 when the engine reported the run's state itself (completed, failed,
    cancelled, or suspended until someone resumes it); 1 when it could not, which Prefect marks Crashed."""


# the modules whose flows birdflow deploys (prefect.yaml, deployments/registration.py): the only code a worker runs
OWN_FLOW_MODULES = frozenset(
    f"birdflow.flows.{name}" for name in ("process_recording", "backfill", "maintenance", "export", "review")
)


class NotOurFlow(Refused):
    """A deployment in the pool names an entrypoint that is not one of birdflow's flows."""


@lru_cache(maxsize=16)
def flow_for(entrypoint: str) -> Flow:
    """Each deployment's flow, imported once per worker process.

    prefect.yaml names files of the repository (flows/process_recording.py:process_recording), the station's own
    deployments module paths (birdflow.flows.process_recording.process_recording; flows.process_recording... before
    the packages moved under `birdflow`); all are modules of the installed birdflow package, imported as such: the
    same module objects (and the same loaded model) for every run. Nothing else is loaded: whoever may create
    deployments in the pool cannot make every Pi import a file of theirs.
    """
    if ":" in entrypoint:
        path, _, name = entrypoint.rpartition(":")
        module_name = path.removesuffix(".py").replace("/", ".")
    else:
        module_name, _, name = entrypoint.rpartition(".")
    if not module_name.startswith("birdflow."):
        module_name = f"birdflow.{module_name}"
    if module_name not in OWN_FLOW_MODULES:
        raise NotOurFlow(
            f"entrypoint {entrypoint!r} is not one of birdflow's flows ({', '.join(sorted(OWN_FLOW_MODULES))})"
        )
    flow = getattr(importlib.import_module(module_name), name, None)
    if not isinstance(flow, Flow):
        raise NotOurFlow(f"entrypoint {entrypoint!r} names no flow of {module_name}")
    return flow


class RunThreads:
    """Long-lived threads that execute flow runs in-process. Each enters its engine context (its API client) at its
    first run and keeps it for all later ones: a client per run would spend much of a run's bookkeeping on TLS
    set-up. Should the API be unreachable then, only that run fails; the next one tries again. Stopped, each thread
    leaves its context on itself, as Prefect's context variables require."""

    def __init__(self, count: int):
        self._queue: queue.Queue = queue.Queue()
        self._threads = [
            threading.Thread(target=self._serve, name=f"birdflow-run-{number}", daemon=True) for number in range(count)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, flow: Flow, flow_run: FlowRun) -> Future:
        running: Future = Future()
        self._queue.put((running, flow, flow_run))
        return running

    def _serve(self) -> None:
        with ExitStack() as engine:
            entered = False
            while (item := self._queue.get()) is not None:
                running, flow, flow_run = item
                if not running.set_running_or_notify_cancel():
                    continue
                try:
                    if not entered:
                        engine.enter_context(engine_context())
                        entered = True
                    running.set_result(run_in_process(flow, flow_run))
                except BaseException as exc:
                    running.set_exception(exc)

    def stop(self) -> None:
        """Runs not started are cancelled; the threads end once the runs in progress have."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _ in self._threads:
            self._queue.put(None)


class BirdflowWorker(BaseWorker[BaseJobConfiguration, BaseVariables, BirdflowWorkerResult]):
    type = "birdflow"
    job_configuration = BaseJobConfiguration
    job_configuration_variables = BaseVariables
    _description = "Runs flow runs inside the worker process, keeping the BirdNET model loaded between runs."
    _display_name = "birdflow (in-process)"
    _documentation_url = "https://prefect.io"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # each thread keeps its API client; all share the process's one BirdNET (flows.run_resources)
        self._threads = RunThreads(kwargs.get("limit") or run_resources().settings.executor_threads)
        self._in_progress: dict[Future, FlowRun] = {}  # the runs executing now
        self._stop_publishing = threading.Event()

    async def __aenter__(self):
        """The station's MQTT messages are published from here too while no executor of the station does
        (birdflow.runtime.mqtt: one publisher per station)."""
        worker = await super().__aenter__()
        settings = run_resources().settings
        if settings.mqtt.mqtt_host:
            publisher = Publisher(settings)
            threading.Thread(target=publisher.run, args=(self._stop_publishing,), name="mqtt", daemon=True).start()
        return worker

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
        running = self._threads.submit(flow, flow_run)
        self._in_progress[running] = flow_run
        running.add_done_callback(lambda done: self._in_progress.pop(done, None))
        state = await asyncio.wrap_future(running)
        reported = state is not None and (state.is_final() or state.is_paused())
        return BirdflowWorkerResult(identifier=str(flow_run.id), status_code=0 if reported else 1)

    def finish_runs(self, grace_s: float = STOP_GRACE_S) -> None:
        """Once no run is taken any more: the runs in progress finish within `grace_s` (their engine reports their
        states), a line each; one still running then is marked Crashed, to be rerun (a backfill skips what it
        processed). None that was queued starts."""
        self._threads.stop()
        deadline = time.monotonic() + grace_s
        for running, flow_run in list(self._in_progress.items()):
            log.info("flow run '%s' in progress: the worker stops once it finishes", flow_run.name)
            try:
                state = running.result(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                self._crash(flow_run, f"still running {grace_s:.0f} s after its worker was asked to stop")
            except Exception as exc:  # the engine could not report its end
                log.warning("flow run '%s' ended without its state: %s: %s", flow_run.name, type(exc).__name__, exc)
            else:
                log.info("flow run '%s' finished: %s", flow_run.name, state.type.value if state else "no state")

    def _crash(self, flow_run: FlowRun, why: str) -> None:
        log.warning("flow run '%s' %s: marked Crashed (rerun it to go on)", flow_run.name, why)
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(flow_run.id, Crashed(message=f"its birdflow worker stopped: {why}"), force=True)

    async def __aexit__(self, *exc_info):
        self._stop_publishing.set()
        self._threads.stop()
        return await super().__aexit__(*exc_info)


def serve(pool: str, limit: int | None) -> int:
    """Take the pool's runs until SIGTERM or SIGINT: then no new run is taken, the runs in progress finish, and the
    worker exits 0 with a line per run it finished. (Prefect's `prefect worker start` CLI does not end on SIGTERM
    once its loops have started, which is how Docker, balena and systemd stop a process.)"""
    return asyncio.run(_serve(pool, limit))


async def _serve(pool: str, limit: int | None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    worker = BirdflowWorker(work_pool_name=pool, limit=limit)
    serving = asyncio.create_task(worker.start(printer=log.info))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([serving, stopping], return_when=asyncio.FIRST_COMPLETED)
    if serving.done():  # it could not start (the pool or the API): its error says why
        stopping.cancel()
        serving.result()
        return 1
    log.info("stopping: no new flow runs are taken from pool %s", pool)
    serving.cancel()
    try:
        await serving
    except asyncio.CancelledError:
        pass
    await asyncio.to_thread(worker.finish_runs)
    log.info("worker stopped")
    return 0
