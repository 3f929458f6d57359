"""`birdflow listen`: simulated listeners that speak the listener protocol to a station."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from birdflow.app.cli.common import at_least, settings_of
from birdflow.core.listener_ids import validate_listener_id


def cmd_listen(args) -> int:
    """Simulated listeners; Ctrl-C (or SIGTERM) ends them and still prints what was sent."""
    from rich.progress import MofNCompleteColumn, Progress

    from birdflow.app.simulated_listeners import split_wav
    from birdflow.core.wav import WavError

    if not args.file.is_file():
        raise SystemExit(f"birdflow: no such file: {args.file}")
    try:
        validate_listener_id(f"{args.prefix}{args.listeners:02d}")
    except ValueError as exc:
        raise SystemExit(f"birdflow: --prefix {args.prefix!r} makes an {exc}") from None
    if not args.upload:
        try:
            split_wav(args.file.read_bytes())
        except WavError as exc:
            needs = "streaming needs a PCM WAV (--upload sends FLAC or MP3)"
            raise SystemExit(f"birdflow: {args.file}: {exc}; {needs}") from None
    if args.url is None:  # the station of this folder (its settings and .env), on this machine
        settings = settings_of(args)
        args.url = f"http://{settings.local_ingest_address}"
        args.health_port = settings.ingest.health_port if args.health_port is None else args.health_port
    total = args.listeners * args.recordings if args.recordings else None
    until = f"{args.recordings} recording(s) each" if args.recordings else "until Ctrl-C"
    stop_signal: list[int] = []

    with Progress(*Progress.get_default_columns(), MofNCompleteColumn(), transient=False) as progress:
        bar = progress.add_task(f"{args.listeners} listener(s) -> {args.url}, {until}", total=total)
        reports = asyncio.run(_listen(args, progress, bar, stop_signal))
    sent = sum(report.recordings_sent for report in reports)
    refused = sum(report.recordings_refused for report in reports)
    failed = sum(report.attempts_failed for report in reports)
    errors = [f"{report.listener_id}: {error}" for report in reports for error in report.errors]
    counted = "".join(f", {count} {what}" for count, what in ((refused, "refused"), (failed, "not delivered")) if count)
    print(f"sent {sent} recording(s) from {len(reports)} listener(s){counted}; {len(errors)} error(s)")
    for error in errors[:10]:
        print(f"  {error}")
    if errors:
        return 1
    # Ctrl-C is how an endless run ends; it interrupts a counted one
    return 0 if not stop_signal or not args.recordings else 128 + stop_signal[0]


async def _listen(args, progress, bar, stop_signal: list[int]) -> list:
    """The simulated listeners until they are done or a signal stops them (noted in `stop_signal`)."""
    import signal

    from birdflow.app.simulated_listeners import run_listeners

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        stop_signal.append(signum)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
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
        health_port=args.health_port if args.health_port is not None else 6000,
    )


def add_commands(commands) -> None:
    listen = commands.add_parser("listen", help="simulate listeners streaming (or uploading) a WAV file")
    listen.add_argument("--file", type=Path, required=True, help="PCM WAV file each listener sends")
    listen.add_argument("--listeners", type=at_least(1), default=1)
    listen.add_argument("--interval", type=float, default=2.0, help="seconds between recordings")
    listen.add_argument(
        "--recordings",
        type=at_least(0),
        default=0,
        help="recordings per listener, each tried once (default 0: until Ctrl-C, reconnecting after failures)",
    )
    listen.add_argument("--stagger", type=float, default=0.0, help="spread listener starts over this many seconds")
    listen.add_argument("--pace", type=float, default=1.0, help="speed relative to real time (0 = no pacing)")
    listen.add_argument("--upload", action="store_true", help="POST /recordings_upload instead of streaming")
    listen.add_argument(
        "--distinct",
        action="store_true",
        help="change one sample per recording so none is a cached repeat (for load tests)",
    )
    listen.add_argument("--prefix", default="listener", help="listener ids are <prefix>01, <prefix>02, ...")
    listen.add_argument(
        "--url", help="the station's ingest API (default: this folder's station on this machine, ingest_port)"
    )
    listen.add_argument(
        "--health-port",
        type=int,
        help="UDP port for a health datagram after each recording (default: the station's health_port); 0: none",
    )
    listen.add_argument(
        "--token",
        help="listener token for ingest_auth (default: $LISTENER_TOKEN); a token is one "
        "listener's, so with several listeners they must be exempt",
    )
    listen.set_defaults(func=cmd_listen)
