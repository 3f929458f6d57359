"""The process_recording flow: analyze -> write detections -> archive, one run per recording.

Thin on purpose: the work happens in birdflow's pure modules; this file names the run, wires the
tasks and sets their retries and cache keys. The analysis is cached on the audio's content hash plus
the model and analysis parameters, and the writes are idempotent, so re-sending or re-running a
recording repeats no inference and writes no duplicate rows. A recording whose audio cannot be
analysed ends in the Failed state named Unprocessable, which is never re-driven.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Any

import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed
from prefect.tasks import exponential_backoff
from pydantic import ValidationError

from birdflow.core.analysis import MODEL_VERSION, AnalysisParams
from birdflow.core.archive import holds_recording
from birdflow.core.audio import MODEL_SAMPLE_RATE, AudioSource, audio_info, decode_span, decoded_blocks, window_batches
from birdflow.core.birdnet import Detection, Heard, is_human
from birdflow.core.clips import clip_budget, clip_plan, flac_bytes, spectrogram_png
from birdflow.core.detections import detections_table, summary
from birdflow.core.errors import Unprocessable
from birdflow.core.flac import FlacError, can_encode, encode_flac
from birdflow.core.ledger import RecordedSpan
from birdflow.core.mqtt_messages import recording_messages
from birdflow.core.privacy import Spans, human_spans, silenced, write_silenced_copy
from birdflow.core.rarity import Tally
from birdflow.core.recordings import RecordingInfo, is_inside, remove_recording, sha256_file
from birdflow.core.sinks import write_all
from birdflow.flows.announce import announce_rare, best_clip_links, show_detections
from birdflow.flows.engine import one_line
from birdflow.flows.review import open_reviews, reviews_wanted
from birdflow.flows.run_resources import RunResources, run_resources
from birdflow.runtime import metrics
from birdflow.runtime.clip_links import clip_links
from birdflow.runtime.mqtt import station_zone, topics_of
from birdflow.settings import Settings
from birdflow.settings.sections import DetectionSettings

# name of the Failed state of a run whose audio cannot be analysed (undecodable, or not what was archived)
UNPROCESSABLE = "Unprocessable"
# the task runs of every recording's run (a clips task and a fetch from the archive only when needed)
RECORDING_TASKS = ("analyze", "write detections", "archive")


def as_recording(value: RecordingInfo | dict[str, Any]) -> RecordingInfo:
    """A run's `recording` parameter as a recording; parameters that are none are Unprocessable."""
    if isinstance(value, RecordingInfo):
        return value
    try:
        return RecordingInfo.model_validate(value)
    except ValidationError as exc:
        raise Unprocessable(f"the run's recording parameter is no recording: {exc}") from None


def run_analysis_params(base: AnalysisParams, overrides: dict[str, Any] | None) -> AnalysisParams:
    """The station's analysis parameters with a run's overrides (a backfill with other thresholds)."""
    if not overrides:
        return base
    try:
        return AnalysisParams(**{**base.model_dump(), **overrides})
    except (ValidationError, TypeError) as exc:
        raise Unprocessable(f"the run's analysis parameters are invalid: {exc}") from None


def analysis_cache_key(recording: RecordingInfo, params: AnalysisParams) -> str:
    """Same audio + same model and parameters = same key: what "already processed" means."""
    return f"heard-{recording.content_hash}-{params.analysis_id}-w{params.range_week(recording.start_time)}"


def _analysis_key(context, parameters) -> str:
    return analysis_cache_key(as_recording(parameters["recording"]), parameters["params"])


class SourceRefused(Unprocessable):
    """A run's source_path lies outside the folders runs may read: not this station's audio to touch."""


class MissingAudio(Unprocessable):
    """Neither the recording's file nor a copy of it in the archive that is this recording."""


def local_path(recording: RecordingInfo, settings: Settings) -> Path:
    if not recording.source_path:
        return settings.recordings_dir / recording.file_name
    if not is_inside(Path(recording.source_path), settings.audio_roots):
        metrics.SOURCES_REFUSED.labels(settings.station_id).inc()
        raise SourceRefused(
            f"{recording.recording_id}: its source_path is outside the recordings, archive and backfill folders "
            "(setting 'backfill_roots')"
        )
    return Path(recording.source_path)


def recording_audio(recording: RecordingInfo, resources: RunResources) -> tuple[AudioSource, float]:
    """(the audio, its duration in seconds), checked to decode: the file in the recordings folder, or what the
    archive holds once the local copy is gone (reruns; fetched by a task of its own, with retries). The samples
    are read a block at a time where they are used."""
    path = local_path(recording, resources.settings)
    source: AudioSource = (
        path if path.is_file() else _with_io_retries(fetch_archived, resources.settings)(recording, resources)
    )
    return source, audio_info(source).duration_s


@task(name="fetch from archive", cache_policy=NO_CACHE, persist_result=False)
def fetch_archived(recording: RecordingInfo, resources: RunResources) -> bytes:
    """The recording read back from the archive, checked to be this recording (a FLAC copy names its source)."""
    for name in recording.archive_names(resources.settings.archive.archive_format):
        data = resources.archive.fetch(recording.archive_key(name))
        if data is None:
            continue
        if not holds_recording(data, recording.content_hash):
            raise MissingAudio(f"archived {recording.archive_key(name)} does not match the recording's content hash")
        return data
    raise MissingAudio(f"recording {recording.recording_id} is neither in the recordings folder nor in the archive")


@task(name="analyze", cache_key_fn=_analysis_key, persist_result=True)
def analyze(recording: RecordingInfo, source: AudioSource, params: AnalysisParams, resources: RunResources) -> Heard:
    """Depends only on the audio and the analysis parameters (the cache key says so), so identical audio is
    analyzed once. The audio streams through: memory does not grow with the recording's length."""
    started = time.perf_counter()
    heard = resources.model.hear_all(
        window_batches(decoded_blocks(source), params.overlap_s), params, recording.start_time
    )
    metrics.ANALYSIS_SECONDS.labels(recording.station_id).observe(time.perf_counter() - started)
    return heard


@task(name="clips", cache_policy=NO_CACHE, persist_result=False)
def keep_clips(
    recording: RecordingInfo,
    audio: tuple[AudioSource, float],
    found: list[Detection],
    human: Spans,
    resources: RunResources,
) -> dict[tuple[float, str], str]:
    """FLAC clip and spectrogram of the detections worth one (the most confident first, at most clip_budget per
    recording; a clip that would not stay is not cut), human spans silenced in them. Returns (start_s, scientific
    name) -> clip key."""
    started = time.perf_counter()
    options, station_id = resources.settings.detections, recording.station_id
    kept: dict[tuple[float, str], str] = {}
    budget = clip_budget(audio[1])
    for detection in sorted(found, key=lambda d: -d.confidence):
        if detection.confidence < options.clip_min_confidence or len(kept) == budget:
            break
        detected_at = recording.start_time + timedelta(seconds=detection.start_s)
        day, species = f"{detected_at:%Y-%m-%d}", detection.scientific_name
        if not resources.clips.wanted(station_id, species, day, detection.confidence):
            continue
        base_key = _cut_clip(recording, audio, detection.start_s, detection.end_s, species, human, resources)
        for pushed_out in resources.clips.keep(base_key, station_id, species, day, detection.confidence):
            resources.archive.delete(pushed_out + ".flac")
            resources.archive.delete(pushed_out + ".png")
        kept[(detection.start_s, species)] = base_key
    metrics.CLIP_SECONDS.labels(station_id).observe(time.perf_counter() - started)
    return kept


@task(name="review clips", cache_policy=NO_CACHE, persist_result=False)
def clip_reviews(
    recording: RecordingInfo,
    audio: tuple[AudioSource, float],
    wanted: list[tuple[dict, str]],
    human: Spans,
    resources: RunResources,
) -> list[tuple[dict, str]]:
    """Every detection asked to be reviewed gets a clip, whatever its confidence: the uncertain ones need a
    listener most. Clips under review leave the per-species budget, so no better clip pushes them out."""
    with_clips = []
    for row, reason in wanted:
        if row["clip_key"]:
            resources.clips.release(row["clip_key"])
        else:
            clip_key = _cut_clip(
                recording, audio, row["start_s"], row["end_s"], row["scientific_name"], human, resources
            )
            row = {**row, "clip_key": clip_key}
        with_clips.append((row, reason))
    return with_clips


def _cut_clip(
    recording: RecordingInfo,
    audio: tuple[AudioSource, float],
    start_s: float,
    end_s: float,
    species: str,
    human: Spans,
    resources: RunResources,
) -> str:
    """One detection's FLAC clip and spectrogram, human spans silenced, stored in the archive; returns its key."""
    source, duration_s = audio
    detected_at = recording.start_time + timedelta(seconds=start_s)
    padding_s = resources.settings.detections.clip_padding_s
    plan = clip_plan(
        recording.station_id, recording.recording_id, species, detected_at, start_s, end_s, padding_s, duration_s
    )
    clip = silenced(decode_span(source, plan.start_s, plan.end_s), MODEL_SAMPLE_RATE, human, plan.start_s)
    _store_bytes(resources, plan.base_key + ".flac", flac_bytes(clip, MODEL_SAMPLE_RATE))
    _store_bytes(resources, plan.base_key + ".png", spectrogram_png(clip, MODEL_SAMPLE_RATE, plan.start_s))
    return plan.base_key


def _store_bytes(resources: RunResources, key: str, data: bytes) -> None:
    staging = resources.settings.staging_dir
    staging.mkdir(parents=True, exist_ok=True)
    path = staging / f"{uuid.uuid4().hex}.clip.partial"
    try:
        path.write_bytes(data)
        resources.archive.store(path, key, hashlib.sha256(data).hexdigest())
    finally:
        path.unlink(missing_ok=True)


# The write and the archive keep no cached result (a file or a row per run that only a rerun would read):
# both are idempotent, so a rerun repeats them and changes nothing.
@task(name="write detections", cache_policy=NO_CACHE, persist_result=False)
def write_detections(recording: RecordingInfo, table: pa.Table, analysis_id: str, resources: RunResources) -> Tally:
    """Rows to every sink, counted in their hours, and rare species announced once they are written (again
    on a retry until the announcement got out: at least once, never for a recording counted before)."""
    station_id = recording.station_id
    tally = resources.species.tally(table, seed_hour=resources.hour_written)
    written = write_all(
        resources.sinks, table, on_failure=lambda sink: metrics.SINK_WRITE_FAILURES.labels(station_id, sink).inc()
    )
    for sink, rows in written.items():
        metrics.DETECTIONS_WRITTEN.labels(station_id, sink).inc(rows)
    for species in table.column("scientific_name").to_pylist():
        metrics.DETECTIONS_BY_SPECIES.labels(station_id, metrics.species_label(species)).inc()
    settings = resources.settings
    once_for = f"{recording.recording_id}:{analysis_id}"
    outbox = resources.outbox  # None without MQTT, or when this recording's messages were queued before
    if outbox is not None and outbox.made(once_for):
        outbox = None
    if not (tally.to_announce or outbox is not None):
        return tally
    detected = table.to_pylist()
    links = clip_links(settings, detected)  # for people elsewhere: only with public_url
    if tally.to_announce:
        announce_rare(
            tally.rare,
            recording.archive_key(recording.archive_names(settings.archive.archive_format)[0]),
            settings.detections if settings.matches_sightings_on_its_prefect else None,
            resources.central_link,
            place=(settings.analysis.latitude, settings.analysis.longitude),
            clips=best_clip_links(detected, links),
        )
        resources.species.announced(recording.recording_id)
        metrics.RARE_SIGHTINGS.labels(station_id).inc(len(tally.rare))
    if outbox is not None:
        rare = {sighting.scientific_name for sighting in tally.rare}
        zone = station_zone(settings)
        messages = recording_messages(detected, rare, topics_of(settings), resources.mqtt_state, zone, links)
        outbox.put(messages, once_for=once_for)
    return tally


@task(name="archive", cache_policy=NO_CACHE, persist_result=False)
def archive_recording(recording: RecordingInfo, resources: RunResources, human: Spans) -> dict[str, Any]:
    """The recording into the archive (with the human spans silenced when there are any)."""
    path = local_path(recording, resources.settings)
    if not path.is_file():
        # decode read it back from the archive, so it is there already
        return {"uploaded": False, "read_back": True}
    with archive_copy(path, recording, resources.settings, human) as (copy, name):
        key = recording.archive_key(name)
        sha256 = sha256_file(copy)
        stored = resources.archive.store(copy, key, sha256)
        if resources.local_copy is not None:
            resources.local_copy.store(copy, key, sha256)
    if stored.uploaded:
        metrics.ARCHIVE_BYTES.labels(recording.station_id, resources.settings.archive.archive_backend).inc(
            stored.size_bytes
        )
    return {"key": key, "uri": stored.uri, "uploaded": stored.uploaded, "bytes": stored.size_bytes}


@contextmanager
def archive_copy(
    path: Path, recording: RecordingInfo, settings: Settings, human: Sequence[tuple[float, float]] = ()
) -> Iterator[tuple[Path, str]]:
    """(file to archive, its name): a checked FLAC copy of a WAV when the settings ask for FLAC, else the file;
    with human spans, a copy with them silenced."""
    name, flac = recording.archive_names(settings.archive.archive_format)[0], None
    if human:
        settings.staging_dir.mkdir(parents=True, exist_ok=True)
        quiet = settings.staging_dir / f"{recording.recording_id}.silenced.partial"
        write_silenced_copy(path, quiet, list(human), name != recording.file_name, recording.content_hash)
        try:
            yield quiet, name
        finally:
            quiet.unlink(missing_ok=True)
        return
    if name != recording.file_name and can_encode(path):
        settings.staging_dir.mkdir(parents=True, exist_ok=True)
        flac = settings.staging_dir / f"{recording.recording_id}.flac.partial"
        try:
            encode_flac(path, flac, recording.content_hash)
        except FlacError as exc:
            get_run_logger().warning("%s; archiving the WAV instead", exc)
            flac = None
    try:
        yield (flac, name) if flac else (path, recording.file_name)
    finally:
        if flac:
            flac.unlink(missing_ok=True)


def worth_retrying(task, task_run, state) -> bool:
    """A read or write that failed may succeed later; audio that cannot be decoded, or an archived copy
    that does not match its hash, fails the same way every time (birdflow/core/errors.py)."""
    return not isinstance(state.result(raise_on_failure=False), Unprocessable)


def _with_io_retries(io_task, settings: Settings):
    return _retrying(io_task, settings.prefect.task_retries, settings.prefect.retry_delay_s)


@cache
def _retrying(io_task, retries: int, delay_s: float):
    """The task with the station's retry policy, built once per policy rather than in every run."""
    return io_task.with_options(
        retries=retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=delay_s),
        retry_condition_fn=worth_retrying,
    )


@cache
def _caching_in(resources: RunResources):
    """The analyze task keeping its results in the station's results database, built once per process."""
    return analyze.with_options(result_storage=resources.result_storage)


# Runs are named when they are created (RecordingInfo.run_name): a flow_run_name here would cost every
# run one more API call to rename it. The recording is read from its parameters in the run (as_recording), not by
# Prefect, which would build a validation model of the signature for every run (~2 ms of CPU).
@flow(name="process-recording", persist_result=False, log_prints=False, validate_parameters=False)
def process_recording(recording: RecordingInfo, analysis: dict[str, Any] | None = None):
    """`analysis` overrides analysis parameters (min_confidence, sensitivity, ...) for this run; its rows
    carry their own analysis id, side by side with earlier ones."""
    resources = run_resources()
    settings = resources.settings
    try:
        recording = as_recording(recording)  # parameters not a recording: Unprocessable, like audio that is not
        params = run_analysis_params(resources.params, analysis)
        audio = recording_audio(recording, resources)  # a source outside the allowed folders fails the run here
        heard = _caching_in(resources)(recording, audio[0], params, resources)
        found, human, audio_kept = apply_privacy(heard, settings.detections)
        clips = {}
        if audio_kept and worth_a_clip(found, settings.detections):  # a task run only then: most recordings have none
            clips = _with_io_retries(keep_clips, settings)(recording, audio, found, human, resources)
        table = detections_table(recording, found, MODEL_VERSION, params.analysis_id, clips)
        logger = get_run_logger()
        logger.info(summary(table))
        tally = _with_io_retries(write_detections, settings)(recording, table, params.analysis_id, resources)
        rare_species = {sighting.scientific_name for sighting in tally.rare}
        wanted_reviews = reviews_wanted(table, rare_species, resources)
        if wanted_reviews and audio_kept and settings.detections.clips_enabled:
            clipping = _with_io_retries(clip_reviews, settings)
            wanted_reviews = clipping(recording, audio, wanted_reviews, human, resources)
        if audio_kept:
            archived = _with_io_retries(archive_recording, settings)(recording, resources, human)
        else:
            archived = {"privacy_dropped": True}
        if human:
            action = "silenced" if audio_kept else "dropped"
            metrics.PRIVACY_FILTERED.labels(recording.station_id, action).inc()
            logger.info(
                "privacy filter: a human was heard in %.0f s of it; audio %s", sum(b - a for a, b in human), action
            )
    except Unprocessable as exc:  # the same audio would fail the same way: not worth a re-drive
        return Failed(name=UNPROCESSABLE, message=f"{type(exc).__name__}: {one_line(str(exc))}")
    except Exception as exc:  # an archive, a sink or the disk failing: re-driven (flows/redrive.py)
        # returned, not raised: Prefect would log the traceback once more and pickle the exception into the
        # station's result storage on every failed attempt
        return Failed(message=f"{type(exc).__name__}: {one_line(str(exc))}")
    if settings.detections.run_artifacts:
        show_detections(table, rare_species, resources.archive.uri)
    open_reviews(wanted_reviews, resources)
    recorded = RecordedSpan(recording.listener_id, recording.start_time, recording.duration_s)
    resources.ledger.record(recording.recording_id, params.analysis_id, table.num_rows, recorded)
    _release_local_copy(recording, settings)
    return {
        "recording_id": recording.recording_id,
        "detections": table.num_rows,
        "rare": len(tally.rare),
        "archive": archived,
    }


def worth_a_clip(found: list[Detection], options: DetectionSettings) -> bool:
    return options.clips_enabled and any(detection.confidence >= options.clip_min_confidence for detection in found)


def apply_privacy(heard: Heard, options: DetectionSettings) -> tuple[list[Detection], Spans, bool]:
    """(detections to keep, human spans to silence, whether any audio is kept) under the privacy filter. With
    the filter on, the human classes are never rows."""
    if options.privacy_filter == "off":
        return heard.detections, [], True
    found = [detection for detection in heard.detections if not is_human(detection.scientific_name)]
    human = human_spans(heard, options.privacy_threshold)
    return found, human, not (human and options.privacy_filter == "drop")


def _release_local_copy(recording: RecordingInfo, settings: Settings) -> None:
    """Analyzed, archived and recorded as processed: the recordings folder lets it go (a copy the settings
    keep is in the local archive). A backfill's source files are not ours to delete."""
    if not recording.source_path:
        remove_recording(local_path(recording, settings))
