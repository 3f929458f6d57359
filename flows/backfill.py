"""The backfill flow: reprocess recordings from a folder, an S3 prefix or the station's archive.

Each recording not yet processed with these analysis parameters (the processed-recordings ledger says
so, long after the runs are deleted) is processed as a child run of process-recording; `dry_run` only
lists them. A summary (found / skipped / processed / failed) is saved as a Prefect artifact. The nightly schedule in prefect.yaml runs it over
the archive, which picks up whatever failed or was never processed.
"""

from __future__ import annotations

import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from birdflow.core.backfill import Candidate, candidate, local_candidates, parse_s3_source, select
from birdflow.core.recordings import AUDIO_EXTENSIONS, RecordingInfo, describe_audio_file, is_inside
from birdflow.settings import Settings
from flows.process_recording import process_recording, run_analysis_params
from flows.resources import station_resources

ARCHIVE = "archive"
# called with (location, done, total) after each recording: the CLI's progress bar
progress_listeners: list[Callable[[str, int, int], None]] = []


class Source:
    """Lists a source's audio files and makes each one a local file for as long as it is processed."""

    def __init__(self, source: str, settings: Settings):
        self.s3 = parse_s3_source(source)
        if source == ARCHIVE:
            if settings.archive.archive_backend == "s3":
                self.s3 = (settings.archive.s3_bucket, settings.archive.s3_prefix)
            else:
                self.folder = settings.local_archive_dir
        elif not self.s3:
            self.folder = Path(source)
            if not self.folder.is_dir():
                raise ValueError(f"backfill source {source!r} is not a folder, s3://bucket/prefix or 'archive'")
            if not is_inside(self.folder, settings.audio_roots):
                raise ValueError(
                    f"backfill source {source!r} is outside the folders this station may read: "
                    "add it to the setting 'backfill_roots'"
                )
        if self.s3:
            from blocks import load_s3_bucket

            self.client = load_s3_bucket(settings).credentials.get_s3_client()
        self.scratch = settings.backfill_scratch_dir

    def candidates(self) -> list[Candidate]:
        if not self.s3:
            return list(local_candidates(self.folder))
        bucket, prefix = self.s3
        found = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                if Path(item["Key"]).suffix.lower() in AUDIO_EXTENSIONS:
                    found.append(candidate(item["Key"], item["LastModified"], item["Size"]))
        return found

    def describe(self, item: Candidate, station_id: str) -> RecordingInfo:
        """Metadata (with the content hash) of a candidate; S3 objects are downloaded to a scratch file."""
        if not self.s3:
            path = Path(item.location)
        else:
            self.scratch.mkdir(parents=True, exist_ok=True)
            # its own folder, under its own name: listener and start time are read from the name
            path = Path(tempfile.mkdtemp(dir=self.scratch)) / item.name
            with open(path, "wb") as file:
                self.client.download_fileobj(self.s3[0], item.location, file)
        info = describe_audio_file(path, station_id, "backfill", modified=item.modified)
        return info.model_copy(update={"source_path": str(path)})

    def release(self, info: RecordingInfo) -> None:
        if self.s3 and info.source_path:
            shutil.rmtree(Path(info.source_path).parent, ignore_errors=True)


@flow(name="backfill", log_prints=False)
def backfill(
    source: str = ARCHIVE,
    since: Optional[datetime] = None,
    until: Optional[datetime] = None,
    listener: Optional[str] = None,
    station: Optional[str] = None,
    analysis: Optional[dict[str, Any]] = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Reprocess what `source` holds: a folder, s3://bucket/prefix, or "archive" (the station's)."""
    logger = get_run_logger()
    resources = station_resources()  # (`station` is the parameter that filters by station)
    settings = resources.settings
    params = run_analysis_params(resources.params, analysis)
    origin = Source(source, settings)
    chosen = select(origin.candidates(), since, until, listener, station)
    ledger = resources.ledger
    summary = {"found": len(chosen), "skipped": 0, "processed": 0, "failed": 0, "would_process": []}
    for number, item in enumerate(chosen, start=1):
        try:
            info = origin.describe(item, settings.station_id)
        except Exception as exc:  # unreadable audio, a vanished object: count it and go on
            logger.warning("cannot read %s: %s", item.location, exc)
            summary["failed"] += 1
            continue
        try:
            if ledger.contains(info.recording_id, params.analysis_id):
                summary["skipped"] += 1
            elif dry_run:
                summary["would_process"].append(item.location)
            else:
                state = process_recording.with_options(flow_run_name=info.run_name)(
                    info, analysis, return_state=True
                )
                summary["processed" if state.is_completed() else "failed"] += 1
        finally:
            origin.release(info)
        for listener_fn in progress_listeners:
            listener_fn(item.location, number, len(chosen))
    logger.info("backfill of %s: %s", source, {key: value for key, value in summary.items() if key != "would_process"})
    create_markdown_artifact(
        key="backfill-summary",
        markdown=summary_markdown(source, summary, params.analysis_id, dry_run),
        description=f"backfill of {source}",
    )
    return summary


def summary_markdown(source: str, summary: dict[str, Any], analysis_id: str, dry_run: bool) -> str:
    lines = [
        f"# Backfill of `{source}`{' (dry run)' if dry_run else ''}",
        f"analysis `{analysis_id}`, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        "| found | skipped (already processed) | processed | failed | would process |",
        "| --- | --- | --- | --- | --- |",
        f"| {summary['found']} | {summary['skipped']} | {summary['processed']} | {summary['failed']} "
        f"| {len(summary['would_process'])} |",
    ]
    lines += [""] + [f"- `{location}`" for location in summary["would_process"][:200]]
    return "\n".join(lines)
