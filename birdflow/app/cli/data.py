"""What was heard, and reprocessing what was recorded."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from birdflow.app.cli.common import at_least, require_prefect, settings_of, settings_with_prefect, utc_time
from birdflow.app.cli.output import print_table
from birdflow.core.export_formats import FORMATS


def selected_detections(settings, args):
    """The local detections that --listener, --species, --since, --until and --min-confidence select."""
    from birdflow.core.sinks import read_detections

    return read_detections(
        settings.detections_dir,
        listener=args.listener,
        species=args.species,
        since=args.since,
        until=args.until,
        min_confidence=args.min_confidence,
    )


def add_selection_arguments(parser) -> None:
    """The options selected_detections reads."""
    parser.add_argument("--listener")
    parser.add_argument("--species", help="scientific or common name")
    parser.add_argument("--since", type=utc_time, help="from this UTC time on (2025-06-01 or 2025-06-01T05:30)")
    parser.add_argument("--until", type=utc_time, help="before this UTC time")
    parser.add_argument("--min-confidence", type=float)


def cmd_detections(args) -> int:
    settings = settings_of(args, reading_only=True)
    table = selected_detections(settings, args)
    if args.limit:
        table = table.slice(max(0, table.num_rows - args.limit))
    if args.format == "table":
        # what fits 80 columns; --wide adds the scientific name and the recording
        columns = ["time", "listener_id", "common_name", "confidence"]
        if args.wide:
            columns[3:3] = ["scientific_name"]
            columns.append("recording_id")
        table = table.select(columns).rename_columns([NARROW_NAMES.get(name, name) for name in columns])
    print_table(table, args.format, title=f"{table.num_rows} detection(s)", wide=args.wide)
    return 0


NARROW_NAMES = {
    "time": "time (UTC)",
    "listener_id": "listener",
    "common_name": "species",
    "scientific_name": "scientific",
}


def cmd_export(args) -> int:
    """The local detections as files other tools read (birdflow.core.exports)."""
    from birdflow.core.exports import ExportError, export, exported_records
    from birdflow.runtime.export_inputs import evidence_for, place_of, publishing_of

    settings = settings_of(args, reading_only=True)
    table = selected_detections(settings, args)
    evidence = evidence_for(settings, table)
    try:
        written = export(
            table,
            args.format,
            args.output,
            place_of(settings),
            evidence,
            publishing_of(settings),
            reviewed_only=args.reviewed_only,
        )
    except ExportError as exc:
        raise SystemExit(f"birdflow export: {exc}") from None
    where = written[0] if args.format == "dwc" else args.output
    chosen = len(exported_records(table, evidence.verdicts, args.reviewed_only))
    print(f"{chosen} detection(s) exported as {args.format}: {len(written)} file(s), {where}")
    return 0


def cmd_sql(args) -> int:
    """One SELECT over the local tables (DuckDB), or with --influx over InfluxDB 3 (its SQL)."""
    from birdflow.core.sql import SqlError, one_line, query, station_tables

    settings = settings_of(args, reading_only=True)
    try:
        if args.influx:
            table = influx_query(settings, args.statement)
        else:
            table = query(args.statement, station_tables(settings.table_folders))
    except SqlError as exc:
        raise SystemExit(f"birdflow sql: {exc}") from None
    except Exception as exc:  # the Influx client's errors: one line, not a traceback
        raise SystemExit(f"birdflow sql: {type(exc).__name__}: {one_line(exc)}") from None
    print_table(table, args.format, wide=args.wide)
    return 0


def influx_query(settings, statement: str):
    """The statement through InfluxDB 3's SQL (read-only by design: its query API cannot write)."""
    from influxdb_client_3 import InfluxDBClient3

    from birdflow.core.sql import SqlError, check_read_only

    sinks = settings.sinks
    if not sinks.influx_host:
        raise SqlError("--influx needs setting 'influx_host' (and INFLUX_TOKEN)")
    check_read_only(statement)
    token = sinks.influx_token.get_secret_value()
    if not token:
        raise SqlError("--influx needs INFLUX_TOKEN (setting 'influx_token'; any value for a server --without-auth)")
    with InfluxDBClient3(host=sinks.influx_host, database=sinks.influx_database, token=token) as client:
        return client.query(statement, language="sql")


def cmd_backfill(args) -> int:
    """A dry run decides here (no Prefect server needed); a real backfill runs the backfill flow."""
    from rich.progress import Progress

    settings = settings_with_prefect(args)
    if not args.dry_run:
        require_prefect(settings)
    from birdflow.flows.backfill import backfill, plan_only, progress_listeners
    from birdflow.flows.run_resources import use_run_resources

    use_run_resources(settings)
    analysis = {"min_confidence": args.min_confidence} if args.min_confidence is not None else None
    selection = dict(since=args.since, until=args.until, listener=args.listener, station=args.station)
    with Progress(transient=True) as progress:
        bar = progress.add_task(f"{'dry run of ' if args.dry_run else ''}backfill {args.source}", total=None)
        progress_listeners.append(lambda location, done, total: progress.update(bar, completed=done, total=total))
        try:
            if args.dry_run:
                summary = plan_only(args.source, settings, analysis, args.allow_unknown, **selection)
            else:
                state = backfill(
                    source=args.source,
                    analysis=analysis,
                    allow_unknown=args.allow_unknown,
                    **selection,
                    return_state=True,
                )
                summary = cast(
                    dict[str, Any], state.result(raise_on_failure=False)
                )  # a run with refusals ends Failed, with its summary
                if isinstance(summary, BaseException):
                    raise summary
        except ValueError as exc:
            raise SystemExit(f"birdflow: {exc}") from None
    print_backfill_summary(summary, args.dry_run)
    return 1 if summary["failed"] or summary["refused"] else 0


def print_backfill_summary(summary: dict, dry_run: bool) -> None:
    print(
        f"found {summary['found']}, skipped {summary['skipped']} (already processed), "
        f"refused {summary['refused']} (unknown listener), processed {summary['processed']}, failed {summary['failed']}"
        + (f", handed to the station's executor {summary['handed']}" if summary.get("handed") else "")
    )
    if summary["unknown_listeners"]:
        print(
            f"not processed: recordings of listener(s) {', '.join(summary['unknown_listeners'])}, which this station "
            "does not know (no token, nothing processed before); add them with `birdflow listeners add ID` or pass "
            "--allow-unknown"
        )
    for line in summary["unreadable"][:20]:
        print(f"unreadable: {line}")
    if dry_run:
        print(f"would process {len(summary['would_process'])}:")
        for location in summary["would_process"]:
            print(f"  {location}")


def add_commands(commands) -> None:
    detections = commands.add_parser("detections", help="list what was heard")
    add_selection_arguments(detections)
    detections.add_argument("--limit", type=at_least(1), help="only the newest N")
    detections.add_argument("--format", choices=("table", "json", "csv"), default="table")
    detections.add_argument("--wide", action="store_true", help="also the scientific name and the recording id")
    detections.set_defaults(func=cmd_detections)

    exports = commands.add_parser(
        "export",
        help="detections as Raven selection tables, Audacity labels, CSV, eBird records or a Darwin Core Archive",
    )
    exports.add_argument("--format", choices=FORMATS, required=True)
    exports.add_argument(
        "--output", type=Path, required=True, help="a folder (dwc: a .zip file, or a folder to put one in)"
    )
    add_selection_arguments(exports)
    exports.add_argument(
        "--reviewed-only",
        action="store_true",
        help="only detections a person confirmed or relabelled (`birdflow review`), under the species they were",
    )
    exports.set_defaults(func=cmd_export)

    sql = commands.add_parser(
        "sql",
        help=(
            "one read-only SELECT over the local tables (detections, species_hourly, listener_health, reviews, and "
            "reviewed: each detection with its verdict), or InfluxDB 3 with --influx"
        ),
    )
    sql.add_argument("statement", help='e.g. "SELECT common_name, count(*) FROM detections GROUP BY 1 ORDER BY 2 DESC"')
    sql.add_argument("--format", choices=("table", "json", "csv"), default="table")
    sql.add_argument("--wide", action="store_true", help="a line a row at the table's natural width, however wide")
    sql.add_argument(
        "--influx", action="store_true", help="run it on InfluxDB 3 (settings influx_host, influx_database)"
    )
    sql.set_defaults(func=cmd_sql)

    backfill = commands.add_parser(
        "backfill", help="reprocess recordings from a folder, s3://bucket/prefix or the archive"
    )
    backfill.add_argument("source", help="a folder (e.g. an SD-card dump), s3://bucket/prefix, or 'archive'")
    backfill.add_argument("--dry-run", action="store_true", help="list what would be processed, process nothing")
    backfill.add_argument("--since", type=utc_time)
    backfill.add_argument("--until", type=utc_time)
    backfill.add_argument("--listener")
    backfill.add_argument("--station", help="only under this station's folder (archive layout)")
    backfill.add_argument("--min-confidence", type=float, help="analyze with this threshold (rows kept side by side)")
    backfill.add_argument(
        "--allow-unknown", action="store_true", help="also listeners this station does not know (a folder's files)"
    )
    backfill.set_defaults(func=cmd_backfill)
