"""What was heard, and reprocessing what was recorded."""

from __future__ import annotations

import json
import sys

from birdflow.app.cli.common import at_least, settings_of, settings_with_prefect, utc_time


def cmd_detections(args) -> int:
    from birdflow.core.sinks import read_detections

    settings = settings_of(args)
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

    settings = settings_with_prefect(args)
    from flows.backfill import backfill, progress_listeners
    from flows.resources import use_station

    use_station(settings)
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


def add_commands(commands) -> None:
    detections = commands.add_parser("detections", help="list what was heard")
    detections.add_argument("--listener")
    detections.add_argument("--species", help="scientific or common name")
    detections.add_argument("--since", type=utc_time, help="from this UTC time on (2025-06-01 or 2025-06-01T05:30)")
    detections.add_argument("--until", type=utc_time, help="before this UTC time")
    detections.add_argument("--min-confidence", type=float)
    detections.add_argument("--limit", type=at_least(1), help="only the newest N")
    detections.add_argument("--format", choices=("table", "json", "csv"), default="table")
    detections.set_defaults(func=cmd_detections)

    backfill = commands.add_parser("backfill", help="reprocess recordings from a folder, s3://bucket/prefix or the archive")
    backfill.add_argument("source", help="a folder (e.g. an SD-card dump), s3://bucket/prefix, or 'archive'")
    backfill.add_argument("--dry-run", action="store_true", help="list what would be processed, process nothing")
    backfill.add_argument("--since", type=utc_time)
    backfill.add_argument("--until", type=utc_time)
    backfill.add_argument("--listener")
    backfill.add_argument("--station", help="only under this station's folder (archive layout)")
    backfill.add_argument("--min-confidence", type=float, help="analyze with this threshold (rows kept side by side)")
    backfill.set_defaults(func=cmd_backfill)
