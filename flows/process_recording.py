"""The process_recording flow: decode -> analyze -> write detections -> archive, one run per recording.

Thin on purpose: the work happens in birdflow's pure modules; this file names the run, wires the
tasks and sets their retries and cache keys. Cache keys are the audio's content hash plus the model
and analysis parameters (plus the sink or archive target), so re-sending or re-running a recording
repeats no inference and writes no duplicate rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from birdflow import metrics
from birdflow.audio import decode, windows
from birdflow.birdnet import MODEL_VERSION, AnalysisParams, Detection
from birdflow.detections import detections_table
from birdflow.recordings import RecordingInfo, remove_recording
from birdflow.sinks import write_all
from flows.runtime import pipeline


def _recording(parameters: dict[str, Any]) -> RecordingInfo:
    value = parameters["recording"]
    return value if isinstance(value, RecordingInfo) else RecordingInfo.model_validate(value)


def analysis_params(overrides: Optional[dict[str, Any]]) -> AnalysisParams:
    """The station's analysis parameters with a run's overrides (a backfill with other thresholds)."""
    base = pipeline().params
    if not overrides:
        return base
    values = {key: tuple(value) if isinstance(value, list) else value for key, value in overrides.items()}
    return dataclasses.replace(base, **values)


def analysis_cache_key(recording: RecordingInfo, params: AnalysisParams) -> str:
    """Same audio + same model and parameters = same key: what "already processed" means."""
    return f"analyze-{recording.content_hash}-{params.analysis_id}-w{params.range_week(recording.start_time)}"


def _analysis_key(context, parameters) -> str:
    return analysis_cache_key(_recording(parameters), parameters["params"])


def _write_key(context, parameters) -> str:
    recording = _recording(parameters)
    target = hashlib.sha256(pipeline().sink_names.encode()).hexdigest()[:8]
    return f"write-{recording.recording_id}-{recording.content_hash}-{parameters['analysis_id']}-{target}"


def _archive_key(context, parameters) -> str:
    recording = _recording(parameters)
    target = hashlib.sha256(f"{pipeline().archive_target}/{recording.archive_key}".encode()).hexdigest()[:12]
    return f"archive-{recording.content_hash}-{target}"


def local_path(recording: RecordingInfo) -> Path:
    if recording.source_path:
        return Path(recording.source_path)
    return pipeline().settings.recordings_dir / recording.file_name


@task(name="decode", cache_policy=NO_CACHE, persist_result=False)
def decode_recording(recording: RecordingInfo) -> np.ndarray:
    """Audio from the recordings folder, or from the archive once the local copy is gone (reruns)."""
    path = local_path(recording)
    if path.is_file():
        return decode(path)
    data = pipeline().archive.fetch(recording.archive_key)
    if hashlib.sha256(data).hexdigest() != recording.content_hash:
        raise ValueError(f"archived {recording.archive_key} does not match the recording's content hash")
    return decode(data)


@task(name="analyze", cache_key_fn=_analysis_key, persist_result=True)
def analyze(recording: RecordingInfo, samples: np.ndarray, params: AnalysisParams) -> list[Detection]:
    """Depends only on the audio and the analysis parameters, so identical audio is analyzed once."""
    runtime = pipeline()
    started = time.perf_counter()
    batch, starts = windows(samples, params.overlap_s)
    found = runtime.model.detect(batch, starts, params, recording.start_time)
    metrics.ANALYSIS_SECONDS.labels(recording.station_id).observe(time.perf_counter() - started)
    return found


@task(name="write detections", cache_key_fn=_write_key, persist_result=True)
def write_detections(recording: RecordingInfo, table: pa.Table, analysis_id: str) -> dict[str, int]:
    station = recording.station_id
    written = write_all(
        pipeline().sinks, table, on_failure=lambda sink: metrics.SINK_WRITE_FAILURES.labels(station, sink).inc()
    )
    for sink, rows in written.items():
        metrics.DETECTIONS_WRITTEN.labels(station, sink).inc(rows)
    for species in table.column("scientific_name").to_pylist():
        metrics.DETECTIONS_BY_SPECIES.labels(station, metrics.species_label(species)).inc()
    return written


@task(name="archive", cache_key_fn=_archive_key, persist_result=True)
def archive_recording(recording: RecordingInfo) -> dict[str, Any]:
    path = local_path(recording)
    if not path.is_file():
        # decode read it back from the archive, so it is there already
        return {"key": recording.archive_key, "uploaded": False}
    stored = pipeline().archive.store(path, recording.archive_key, recording.content_hash)
    if stored.uploaded:
        metrics.ARCHIVE_BYTES.labels(recording.station_id, pipeline().settings.archive_backend).inc(stored.size_bytes)
    return {"key": recording.archive_key, "uri": stored.uri, "uploaded": stored.uploaded}


def worth_retrying(task, task_run, state) -> bool:
    """A read or write that failed may succeed later; audio that cannot be decoded, or an archived copy
    that does not match its hash, fails the same way every time."""
    return not isinstance(state.result(raise_on_failure=False), ValueError)


def _with_io_retries(io_task):
    settings = pipeline().settings
    return _retrying(io_task, settings.task_retries, settings.retry_delay_s)


@lru_cache(maxsize=None)
def _retrying(io_task, retries: int, delay_s: float):
    """The task with the station's retry policy, built once per policy rather than in every run."""
    return io_task.with_options(
        retries=retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=delay_s),
        retry_condition_fn=worth_retrying,
    )


# Runs are named when they are created (RecordingInfo.run_name): a flow_run_name here would cost every
# run one more API call to rename it.
@flow(name="process-recording", persist_result=False, log_prints=False)
def process_recording(recording: RecordingInfo, analysis: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """`analysis` overrides analysis parameters (min_confidence, sensitivity, ...) for this run; its rows
    carry their own analysis id, side by side with earlier ones."""
    params = analysis_params(analysis)
    samples = _with_io_retries(decode_recording)(recording)
    found = analyze(recording, samples, params)
    table = detections_table(recording, found, MODEL_VERSION, params.analysis_id)
    written = _with_io_retries(write_detections)(recording, table, params.analysis_id)
    archived = _with_io_retries(archive_recording)(recording)
    _finish_local_copy(recording)
    return {"recording_id": recording.recording_id, "detections": table.num_rows, "written": written, "archive": archived}


def _finish_local_copy(recording: RecordingInfo) -> None:
    """Analyzed and archived: the local WAV is no longer needed (unless the settings keep it).
    A backfill's source files are not ours to delete."""
    path = local_path(recording)
    if recording.source_path or not path.is_file():
        return
    settings = pipeline().settings
    if settings.keep_local_recordings:
        settings.kept_dir.mkdir(parents=True, exist_ok=True)
        path.replace(settings.kept_dir / path.name)
        path.with_suffix(".json").replace(settings.kept_dir / path.with_suffix(".json").name)
    else:
        remove_recording(path)
