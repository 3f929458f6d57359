"""Running the station: the whole stack, or one of its processes."""

from __future__ import annotations

import logging
import os
import sys
import threading

from birdflow.app.cli.common import at_least, settings_of, settings_with_prefect


def cmd_up(args) -> int:
    from birdflow.app.supervisor import supervise

    settings = settings_of(args)
    if args.postgres:
        settings.prefect.prefect_database = "postgres"
    return supervise(settings, args.settings)


def cmd_ingest(args) -> int:
    import uvicorn

    from birdflow.ingest_api.app import create_app
    from birdflow.ingest_api.connections import raise_open_file_limit, server_config

    settings = settings_of(args)
    open_files = raise_open_file_limit()
    if open_files < 4 * settings.ingest.max_open_streams:
        logging.getLogger("birdflow.ingest").warning(
            "open-file limit %d is low for max_open_streams=%d (docs/security.md: LimitNOFILE)",
            open_files,
            settings.ingest.max_open_streams,
        )
    uvicorn.Server(server_config(create_app(settings), settings, args.host, args.port)).run()
    return 0


def cmd_execute(args) -> int:
    import signal

    import httpx

    from birdflow.app.single import AlreadyRunning, hold_lock
    from birdflow.deployments.registration import register_deployments
    from birdflow.flows.executor import EXECUTOR_LOCK, Executor, ExecutorFailed

    settings = settings_with_prefect(args)
    log = logging.getLogger("birdflow.executor")
    try:
        hold_lock(settings.data_dir / EXECUTOR_LOCK, "an executor")  # held until this process exits
    except AlreadyRunning as exc:
        log.error("%s", exc)
        return 1
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        Executor(settings, register_deployments(settings)).run_forever(stop)
    except ExecutorFailed as exc:
        log.error("executor stopped: %s", exc)
        return 1
    except httpx.TransportError as exc:
        log.error("executor stopped: cannot reach the Prefect API at %s: %s", os.environ["PREFECT_API_URL"], exc)
        return 1
    return 0


def cmd_relay(args) -> int:
    """The station's link to its fleet's central Prefect (flows/relay.py); `up` starts it with central_api_url."""
    import signal

    from birdflow.app.prefect_env import use_prefect

    settings = settings_of(args)
    if not settings.prefect.central_api_url:
        raise SystemExit("birdflow relay: setting 'central_api_url' is empty: there is no central Prefect to relay to")
    use_prefect(settings, central=True)
    from birdflow.flows.relay import Relay

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    Relay(settings).run_forever(stop)
    return 0


def cmd_worker(args) -> int:
    """The birdflow worker type on this station's pool (flows/worker.py), with birdflow's Prefect settings."""
    from birdflow.app.prefect_env import use_prefect
    from birdflow.flows.run_resources import use_run_resources
    from birdflow.settings import SETTINGS_FILE_ENV, settings_file_in_use

    settings = settings_of(args)
    settings_file = settings_file_in_use(args.settings)
    if settings_file:  # absolute: the runs it starts work in BIRDFLOW_HOME, not in this folder
        settings_file = settings_file.resolve()
        os.environ[SETTINGS_FILE_ENV] = str(settings_file)
    pool = args.pool or f"birdflow-{settings.station_id}"
    print(
        f"birdflow worker of station {settings.station_id} on pool {pool}, settings from "
        + (str(settings_file) if settings_file else "the environment and the defaults (no settings.yaml here)"),
        file=sys.stderr,
    )
    # the pool is on the fleet's central server, also when the station keeps its recordings' runs on its own
    use_prefect(settings, central=bool(settings.prefect.central_api_url))
    use_run_resources(settings)
    from birdflow.flows.worker import serve

    return serve(pool, args.limit or settings.executor_threads)


def add_commands(commands) -> None:
    up = commands.add_parser("up", help="start the whole stack (Prefect server, ingest API, executor)")
    up.add_argument("--postgres", action="store_true", help="run the embedded Prefect server on Postgres")
    up.set_defaults(func=cmd_up)

    ingest = commands.add_parser("ingest", help="run only the ingest API")
    ingest.add_argument("--host")
    ingest.add_argument("--port", type=int)
    ingest.set_defaults(func=cmd_ingest)

    commands.add_parser("execute", help="run only the flow-run executor").set_defaults(func=cmd_execute)

    commands.add_parser(
        "relay", help="send the fleet's central Prefect this station's hourly summaries and rare-species events"
    ).set_defaults(func=cmd_relay)

    worker = commands.add_parser("worker", help="run this station's work pool (birdflow-<station_id>) in-process")
    worker.add_argument("--pool", help="work pool (default birdflow-<station_id>)")
    worker.add_argument(
        "--limit", type=at_least(1), help="flow runs at once (default: executor_workers: the interpreters, plus one)"
    )
    worker.set_defaults(func=cmd_worker)
