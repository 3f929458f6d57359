"""What birdflow borrows from Prefect beyond its documented surface: every such name, why, and the tested range.

Everything else in the tree uses Prefect's public client, flows, blocks, workers and deployments. The names below
are kept each for a measured reason (BORROWED says which); the compat test (tests/runtime/test_internals.py)
resolves each one and checks the parameters birdflow calls it with, so that a Prefect upgrade starts with one failing
test that lists what moved. Importing this module on a Prefect outside TESTED_PREFECT fails, naming it.

The client-side names are imported here; the server's (only the embedded server's process needs them) on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import prefect
import prefect.task_engine
from prefect._flow_run_suspension import register_flow_run_suspension_request
from prefect.flow_engine import FlowRunEngine

from birdflow.runtime.borrowed import Borrowed, check_tested

if TYPE_CHECKING:
    from docket import Depends, Perpetual
    from prefect.server.database import PrefectDBInterface, provide_database_interface
    from prefect.server.database.configurations import SQLITE_BEGIN_MODE, AioSqliteConfiguration
    from prefect.server.schemas.states import TERMINAL_STATES
    from prefect.server.services.db_vacuum import vacuum_old_events, vacuum_old_flow_runs
    from prefect.server.services.perpetual_services import perpetual_service

TESTED_PREFECT = ((3, 9), (3, 10))  # from the first minor, up to (not including) the second


ENGINE = "prefect.flow_engine:FlowRunEngine"
BORROWED: tuple[Borrowed, ...] = (
    # flows/engine.py: runs executed inside the long-lived executor and worker (the model stays loaded)
    Borrowed(
        ENGINE, "the engine a long-lived process runs many flow runs with", calls=("flow", "parameters", "flow_run")
    ),
    Borrowed(f"{ENGINE}.initialize_run", "a run created Running skips the engine's update of its retry policy"),
    Borrowed(f"{ENGINE}.setup_run_context", "a run created Running is not read back", calls=("client",)),
    Borrowed(f"{ENGINE}.set_state", "a run created Running is not claimed again", calls=("state", "force")),
    Borrowed(
        f"{ENGINE}.setup_flow_run_suspension_request",
        "no per-run observer thread, event loop and websocket: it cost more than the run's own bookkeeping",
    ),
    Borrowed(f"{ENGINE}._get_flow_run_suspension_request", "the request the override above registers"),
    Borrowed(
        "prefect._flow_run_suspension:register_flow_run_suspension_request",
        "what the engine's own setup does, without its observer",
        calls=("flow_run_id", "suspension_request"),
    ),
    Borrowed(
        "prefect._flow_run_suspension:FlowRunSuspensionRequest.raise_if_requested",
        "a suspension requested before the run starts stops it, as upstream",
    ),
    Borrowed(
        "prefect.task_engine:emit_task_run_state_change_event",
        "a task run's Pending event is not sent (its Running creates the task run): one event and ~2 ms of server"
        " CPU per task run",
        calls=("task_run", "initial_state", "validated_state", "follows"),
    ),
    Borrowed(
        "prefect.client.orchestration:SyncPrefectClient.update_flow_run",
        "answered by the run's own thread for a run created Running",
        calls=("flow_run_id",),
    ),
    Borrowed(
        "prefect.client.orchestration:SyncPrefectClient.read_flow_run",
        "answered by the run's own thread for a run created Running",
        calls=("flow_run_id",),
    ),
    Borrowed(
        "prefect.flow_engine",
        "its routine lines are dropped from the run logs (~15 % of each run's rows) and its run link goes"
        " through the UI's login",
        says=("Beginning {run_type} run", "Finished in state {display_state}", "View at {flow_run_url}"),
    ),
    # birdflow/app/prefect_server.py: the embedded server's SQLite transactions and history budget
    Borrowed(
        "prefect.server.database.configurations:AioSqliteConfiguration.begin_transaction",
        "transactions begun IMMEDIATE: DEFERRED ones failed a third of run creations under a backlog (503)",
        calls=("session", "with_for_update"),
    ),
    Borrowed("prefect.server.database.configurations:SQLITE_BEGIN_MODE", "how a transaction begins, per context"),
    Borrowed(
        "prefect.server.database.dependencies:MODELS_DEPENDENCIES",
        "where the server takes its database configuration from (the one above)",
    ),
    Borrowed(
        "prefect.server.database:provide_database_interface",
        "the history budget counts and deletes runs in the server's own database session",
    ),
    Borrowed("prefect.server.database:PrefectDBInterface.FlowRun", "the flow-run table the budget counts"),
    Borrowed("prefect.server.database:PrefectDBInterface.session_context", "a session of the server's database"),
    Borrowed("prefect.server.schemas.states:TERMINAL_STATES", "only ended runs are deleted"),
    Borrowed(
        "prefect.server.services.db_vacuum:vacuum_old_flow_runs",
        "runs deleted with their task runs, logs and artifacts as Prefect's own vacuum deletes them",
        calls=("db",),
    ),
    Borrowed(
        "prefect.server.services.db_vacuum:vacuum_old_events",
        "the events of the runs deleted go with them (else they stay their 7 days, and runs make way for them)",
        calls=("db",),
    ),
    Borrowed(
        "prefect.server.services.perpetual_services:perpetual_service",
        "the budget runs on the server's own service scheduler: no second process holding the database",
        calls=("enabled_getter",),
    ),
    Borrowed("docket:Perpetual", "how often the budget service runs", calls=("automatic", "every")),
    Borrowed("docket:Depends", "the budget service's database interface"),
    Borrowed("prefect.cli:app", "`prefect server start` run in the process that configured the above"),
)

# names the server's process takes from here, imported on first use (a client process never loads the server)
_SERVER_NAMES = {
    "AioSqliteConfiguration": "prefect.server.database.configurations",
    "SQLITE_BEGIN_MODE": "prefect.server.database.configurations",
    "PrefectDBInterface": "prefect.server.database",
    "provide_database_interface": "prefect.server.database",
    "TERMINAL_STATES": "prefect.server.schemas.states",
    "vacuum_old_flow_runs": "prefect.server.services.db_vacuum",
    "vacuum_old_events": "prefect.server.services.db_vacuum",
    "perpetual_service": "prefect.server.services.perpetual_services",
    "Perpetual": "docket",
    "Depends": "docket",
}

__all__ = [
    "BORROWED",
    "TESTED_PREFECT",
    "FlowRunEngine",
    "register_flow_run_suspension_request",
    "replace_task_state_emitter",
    "use_database_configuration",
    "prefect_cli",
    # the server's, imported on first use
    "AioSqliteConfiguration",
    "SQLITE_BEGIN_MODE",
    "PrefectDBInterface",
    "provide_database_interface",
    "TERMINAL_STATES",
    "vacuum_old_flow_runs",
    "vacuum_old_events",
    "perpetual_service",
    "Perpetual",
    "Depends",
]


check_tested(__name__, "Prefect", prefect.__version__, TESTED_PREFECT)


def replace_task_state_emitter(wrap: Any) -> None:
    """Prefect's task engine emits task-run state events through `wrap(its emitter)` from now on (once)."""
    emitter = prefect.task_engine.emit_task_run_state_change_event
    if not getattr(emitter, "wrapped_by_birdflow", False):
        replacement = wrap(emitter)
        replacement.wrapped_by_birdflow = True
        prefect.task_engine.emit_task_run_state_change_event = replacement


def use_database_configuration(configuration: Any) -> None:
    """The server of this process uses `configuration` for its database (set before it starts)."""
    from prefect.server.database.dependencies import MODELS_DEPENDENCIES

    MODELS_DEPENDENCIES["database_config"] = configuration


def prefect_cli() -> Any:
    """Prefect's command line (`prefect ...`), to run in this process."""
    from prefect.cli import app

    return app


def __getattr__(name: str) -> Any:
    if name in _SERVER_NAMES:
        return getattr(importlib.import_module(_SERVER_NAMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
