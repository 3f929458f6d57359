"""The export flow: a day's detections as the files science tools read (birdflow.core.exports), stored in the
station's archive (local or S3) under `exports/<station>/<YYYY>/<MM>/<DD>/`, and linked from the run's page.
prefect.yaml deploys it daily, for the day before; `birdflow export` writes the same files by hand."""

from __future__ import annotations

import tempfile
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from birdflow.core.exports import FORMATS, ExportError, export
from birdflow.core.recordings import sha256_file
from birdflow.core.sinks import read_detections
from birdflow.flows.run_resources import run_resources
from birdflow.runtime.export_inputs import evidence_for, place_of, publishing_of

DAILY_FORMATS = ("csv", "raven", "audacity", "ebird", "dwc")


def day_to_export(day: date | None) -> date:
    """The day asked for, else the day before today (UTC): what the daily deployment exports."""
    return day or (datetime.now(timezone.utc) - timedelta(days=1)).date()


def run_name() -> str:
    """`export-<day>`, the day a scheduled run (which passes none) exports included."""
    from prefect.runtime import flow_run

    return f"export-{day_to_export(flow_run.parameters.get('day'))}"


def export_key(station_id: str, day: date, format: str, name: str) -> str:
    return f"exports/{station_id}/{day:%Y/%m/%d}/{format}/{name}"


@flow(name="export", flow_run_name=run_name, log_prints=False)
def export_day(day: date | None = None, formats: list[str] | None = None) -> dict[str, list[str]]:
    """The detections of `day` (UTC; the day before today when not given) in each of `formats`, archived.
    Returns the archive URIs by format; a format that cannot be made (dwc without the station's coordinates)
    is skipped with a warning, not failed."""
    logger = get_run_logger()
    resources = run_resources()
    settings = resources.settings
    day = day_to_export(day)
    formats = formats or list(DAILY_FORMATS)
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}: use {', '.join(FORMATS)}")
    since = datetime.combine(day, time(), timezone.utc)
    table = read_detections(settings.detections_dir, since=since, until=since + timedelta(days=1))
    place, publishing, evidence = place_of(settings), publishing_of(settings), evidence_for(settings, table)
    archived: dict[str, list[str]] = {}
    settings.staging_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=settings.staging_dir) as folder:
        for format in formats:
            output = Path(folder) / format
            try:
                target = output / "occurrences.zip" if format == "dwc" else output
                written = export(table, format, target, place, evidence, publishing)
            except ExportError as exc:
                logger.warning("export %s of %s skipped: %s", format, day, exc)
                continue
            archived[format] = [
                resources.archive.store(
                    path, export_key(settings.station_id, day, format, path.name), sha256_file(path)
                ).uri
                for path in written
            ]
    logger.info("%d detection(s) of %s exported: %s", table.num_rows, day, ", ".join(archived) or "nothing")
    create_markdown_artifact(
        key="export", markdown=export_markdown(day, table.num_rows, archived), description=f"exports of {day}"
    )
    return archived


def export_markdown(day: date, detections: int, archived: dict[str, list[str]]) -> str:
    lines = [f"# Exports of {day}", "", f"{detections} detection(s).", "", "| format | files |", "|---|---|"]
    for format, uris in archived.items():
        shown = ", ".join(f"[{uri.rsplit('/', 1)[-1]}]({uri})" for uri in uris[:20])
        lines.append(f"| {format} | {shown}{' ...' if len(uris) > 20 else ''} ({len(uris)}) |")
    return "\n".join(lines) + "\n"
