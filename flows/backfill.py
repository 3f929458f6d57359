"""The backfill flow: reprocess recordings from a folder, an S3 prefix or the station's archive.

Each recording not yet processed with these analysis parameters (the processed-recordings ledger says
so, long after the runs are deleted) is processed as a child run of process-recording; `dry_run` only
lists them. A backfill that a station keeping its own run history runs from its fleet's central server hands
the recordings to the station's executor instead (its recordings folder), so that their runs are on the
station's own server like every other recording's; with analysis overrides, they are child runs as before.
A summary (found / skipped / processed / handed / failed) is saved as a Prefect artifact. The nightly
schedule in prefect.yaml runs it over the archive, which picks up whatever failed or was never processed.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import State
from prefect.states import Failed

from birdflow.core.backfill_plan import (
    ALREADY_PROCESSED,
    UNKNOWN_LISTENER,
    Candidate,
    Decision,
    local_candidates,
    parse_s3_source,
    plan,
    s3_candidates,
    select,
)
from birdflow.core.ledger import ProcessedLedger
from birdflow.core.recordings import RecordingInfo, RecordingStore, describe_audio_file, is_inside
from birdflow.flows.process_recording import process_recording, run_analysis_params
from birdflow.flows.run_resources import run_resources
from birdflow.runtime.state_files import processed_ledger
from birdflow.settings import Settings

ARCHIVE = "archive"
# recordings handed to the station's executor and not yet run, at most: the rest waits in the source
HANDED_AHEAD = 8
# a backlog that has not shrunk for this long: the station's executor is not running, the backfill fails saying so
EXECUTOR_PATIENCE_S = 600.0
# called with (location, done, total) after each recording: the CLI's progress bar
progress_listeners: list[Callable[[str, int, int], None]] = []


class Source:
    """Lists a source's audio files and makes each one a local file for as long as it is processed."""

    def __init__(self, source: str, settings: Settings, offline: bool = False):
        """`offline`: S3 credentials from the settings, not from the block on the Prefect server (a dry run)."""
        self.s3 = parse_s3_source(source)
        if source == ARCHIVE:
            if settings.archive.archive_backend == "s3":
                self.s3 = (settings.archive.s3_bucket, settings.archive.s3_prefix)
            else:
                self.folder = settings.local_archive_dir
        elif not self.s3:
            self.folder = Path(source)
            if not self.folder.is_dir():
                if self.folder.resolve() == settings.failed_dir.resolve():
                    raise ValueError(
                        f"backfill source {source!r}: nothing has failed on this station (the folder comes with the "
                        "first failure)"
                    )
                raise ValueError(f"backfill source {source!r} is not a folder, s3://bucket/prefix or 'archive'")
            if not is_inside(self.folder, settings.audio_roots):
                raise ValueError(
                    f"backfill source {source!r} is outside the folders this station may read: "
                    "add it to the setting 'backfill_roots'"
                )
        if self.s3:
            from birdflow.blocks import load_s3_bucket, s3_bucket_from_settings

            bucket = s3_bucket_from_settings(settings) if offline else load_s3_bucket(settings)
            self.client = bucket.credentials.get_s3_client()
        self.scratch = settings.backfill_scratch_dir

    def candidates(self) -> list[Candidate]:
        return list(s3_candidates(self.client, *self.s3) if self.s3 else local_candidates(self.folder))

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


def known_listeners(settings: Settings, ledger: ProcessedLedger) -> set[str]:
    """Listeners this station knows: those with a token, and those it has processed recordings of."""
    from birdflow.core.listener_tokens import ListenerTokens

    tokens = ListenerTokens(settings.listener_tokens_file).listed() if settings.listener_tokens_file.exists() else []
    return {record.listener_id for record in tokens} | ledger.listener_ids()


def decide(
    source: str,
    settings: Settings,
    ledger: ProcessedLedger,
    analysis_id: str,
    selection: dict[str, Any],
    allow_unknown: bool,
    offline: bool = False,
) -> tuple[Source, list[Candidate], Iterator[Decision]]:
    """The source, what it holds that the selection picks, and each one's decision (made lazily, in order).
    Only a folder (an SD-card dump) is checked for listeners the station does not know; its archive and S3
    prefixes hold its own recordings."""
    origin = Source(source, settings, offline)
    chosen = select(origin.candidates(), **selection)
    known = None if allow_unknown or origin.s3 or source == ARCHIVE else known_listeners(settings, ledger)
    decisions = plan(
        chosen,
        describe=lambda item: origin.describe(item, settings.station_id),
        processed=lambda recording_id: ledger.contains(recording_id, analysis_id),
        known_recording=lambda item: ledger.recording_of_file(item.location, item.size, item.modified.timestamp()),
        listener_known=(lambda listener: True) if known is None else known.__contains__,
    )
    return origin, chosen, decisions


def new_summary(found: int) -> dict[str, Any]:
    return {
        "found": found,
        "skipped": 0,
        "refused": 0,
        "processed": 0,
        "handed": 0,
        "failed": 0,
        "would_process": [],
        "unknown_listeners": [],
        "unreadable": [],
    }


def count(summary: dict[str, Any], decision: Decision) -> None:
    """A skipped file in the summary, under its reason."""
    if decision.reason == ALREADY_PROCESSED:
        summary["skipped"] += 1
    elif decision.reason == UNKNOWN_LISTENER:
        summary["refused"] += 1
        if decision.detail not in summary["unknown_listeners"]:
            summary["unknown_listeners"].append(decision.detail)
    else:
        summary["failed"] += 1
        summary["unreadable"].append(f"{decision.item.location}: {decision.detail}")


def walk(
    origin: Source,
    chosen: list[Candidate],
    decisions: Iterator[Decision],
    on_process: Callable[[Decision, dict[str, Any]], None],
) -> dict[str, Any]:
    """Each decision in turn: a skipped file counted under its reason, the rest handed to `on_process`; scratch
    downloads released and progress reported either way."""
    summary = new_summary(len(chosen))
    for number, decision in enumerate(decisions, start=1):
        try:
            if decision.process:
                on_process(decision, summary)
            else:
                count(summary, decision)
        finally:
            if decision.info:
                origin.release(decision.info)
        for listener_fn in progress_listeners:
            listener_fn(decision.item.location, number, len(chosen))
    return summary


def would_process(decision: Decision, summary: dict[str, Any]) -> None:
    summary["would_process"].append(decision.item.location)


def plan_only(
    source: str, settings: Settings, analysis: dict[str, Any] | None = None, allow_unknown: bool = False, **selection
) -> dict[str, Any]:
    """What a backfill would do, decided here without Prefect (no server needed)."""
    params = run_analysis_params(settings.analysis.parameters(), analysis)
    ledger = processed_ledger(settings)
    return walk(
        *decide(source, settings, ledger, params.analysis_id, selection, allow_unknown, offline=True), would_process
    )


@flow(name="backfill", flow_run_name="backfill-{source}", log_prints=False)
def backfill(
    source: str = ARCHIVE,
    since: datetime | None = None,
    until: datetime | None = None,
    listener: str | None = None,
    station: str | None = None,
    analysis: dict[str, Any] | None = None,
    dry_run: bool = False,
    allow_unknown: bool = False,
) -> dict[str, Any] | State:
    """Reprocess what `source` holds: a folder, s3://bucket/prefix, or "archive" (the station's)."""
    logger = get_run_logger()
    resources = run_resources()
    settings = resources.settings
    params = run_analysis_params(resources.params, analysis)
    selection = {"since": since, "until": until, "listener": listener, "station": station}
    ledger = resources.ledger

    store = RecordingStore(settings.partial_dir, settings.recordings_dir, settings.station_id)

    def hand_over(decision: Decision, summary: dict[str, Any]) -> None:
        info = decision.info
        assert info is not None and info.source_path, "a decision to process carries what was read of the file"
        waited_since, backlog = time.monotonic(), len(store.pending())
        while backlog >= HANDED_AHEAD:  # the archive stays the queue, not the station's disk
            time.sleep(1)
            waiting = len(store.pending())
            if waiting < backlog:
                waited_since = time.monotonic()
            elif time.monotonic() - waited_since > EXECUTOR_PATIENCE_S:
                raise RuntimeError(
                    f"the station's executor has run none of its {waiting} waiting recordings for "
                    f"{EXECUTOR_PATIENCE_S:.0f} s: is `birdflow up` running? {summary['handed']} handed so far"
                )
            backlog = waiting
        store.hand_in(Path(info.source_path), info.model_copy(update={"source_path": None}))
        summary["handed"] += 1

    def process(decision: Decision, summary: dict[str, Any]) -> None:
        info, item = decision.info, decision.item
        assert info is not None, "a decision to process carries what was read of the file"
        run = process_recording.with_options(flow_run_name=info.run_name)
        state = cast(State, run(info, analysis, return_state=True))
        summary["processed" if state.is_completed() else "failed"] += 1
        if state.is_completed():
            ledger.remember_file(item.location, item.size, item.modified.timestamp(), info.recording_id)

    decided = decide(source, settings, ledger, params.analysis_id, selection, allow_unknown)
    handing = not dry_run and hands_to_station(settings, analysis)
    summary = walk(*decided, would_process if dry_run else hand_over if handing else process)
    if handing:
        logger.info(
            "%d recording(s) handed to the station's executor: their runs are on its own server", summary["handed"]
        )
    for line in summary["unreadable"]:
        logger.warning("cannot read %s", line)
    if summary["unknown_listeners"]:
        logger.warning(
            "%d recording(s) of listeners this station does not know were not processed: %s (allow_unknown)",
            summary["refused"],
            ", ".join(summary["unknown_listeners"]),
        )
    logger.info("backfill of %s: %s", source, {key: value for key, value in summary.items() if key != "would_process"})
    create_markdown_artifact(
        key="backfill-summary",
        markdown=summary_markdown(source, summary, params.analysis_id, dry_run),
        description=f"backfill of {source}",
    )
    if summary["failed"] or summary["refused"]:  # what the command exits 1 for: the run says so too
        return Failed(
            message=f"backfill of {source}: {summary['refused']} refused (unknown listener: allow_unknown), "
            f"{summary['failed']} failed, {summary['processed']} processed",
            data=summary,
        )
    return summary


def hands_to_station(settings: Settings, analysis: dict[str, Any] | None) -> bool:
    """Whether this run is on the fleet's central server of a station that keeps its own run history (and asks
    for the station's own analysis parameters)."""
    from prefect.settings import get_current_settings

    central = settings.prefect.central_api_url.rstrip("/")
    return bool(central) and not analysis and (get_current_settings().api.url or "").rstrip("/") == central


def summary_markdown(source: str, summary: dict[str, Any], analysis_id: str, dry_run: bool) -> str:
    lines = [
        f"# Backfill of `{source}`{' (dry run)' if dry_run else ''}",
        f"analysis `{analysis_id}`, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        "| found | skipped (already processed) | refused (unknown listener) | processed | handed to the station "
        "| failed | would process |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {summary['found']} | {summary['skipped']} | {summary['refused']} | {summary['processed']} "
        f"| {summary['handed']} | {summary['failed']} | {len(summary['would_process'])} |",
    ]
    lines += [""] + [f"- `{location}`" for location in summary["would_process"][:200]]
    return "\n".join(lines)
