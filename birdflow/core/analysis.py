"""What an analysis is, apart from running it: the model version and the parameters that change what
BirdNET reports for the same audio. Light on purpose (pydantic only): the settings are built on it, and
every process reads the settings, including those that never load the model."""

from __future__ import annotations

import calendar
import hashlib
import json
import math
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MODEL_VERSION = "BirdNET_GLOBAL_6K_V2.4"
# parameters renamed since analysis ids were first issued: the digest keeps the first name, so an analysis id (and
# with it every cached result, processed-record entry and detection id) stays what it was
NAME_IN_DIGEST = {"confirm_count_window_s": "confirm_window_s"}


class AnalysisParams(BaseModel):
    """Everything that changes what BirdNET reports for the same audio (part of the cache key). The
    station's settings (their analysis section) are these parameters and their only defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_confidence: float = Field(0.25, ge=0.01, le=0.99, description="Detections below this are not reported")
    overlap_s: float = Field(0.0, ge=0.0, lt=3.0, description="Overlap of consecutive 3 s windows")
    sensitivity: float = Field(1.0, ge=0.5, le=1.5, description="BirdNET's sigmoid sensitivity")
    latitude: float | None = Field(None, ge=-90, le=90, description="With longitude: the range filter's place")
    longitude: float | None = Field(None, ge=-180, le=180)
    species_week: int = Field(0, ge=-1, le=48, description="Range filter week: 0 from the recording date, -1 all year")
    range_filter_threshold: float = Field(
        0.03, gt=0, lt=1, description="Species less likely than this here are dropped"
    )
    include_species: tuple[str, ...] = Field((), description="Only these (scientific or common names)")
    exclude_species: tuple[str, ...] = Field((), description="Never these")
    species_min_confidence: tuple[tuple[str, float], ...] = Field(
        (),
        description="Thresholds of their own (species: threshold, scientific or common name), above or below "
        "min_confidence; in the environment 'Spinus tristis=0.6, American Robin=0.4'",
    )
    confirm_count: int = Field(
        1, ge=1, le=20, description="A species is reported once heard in this many windows of confirm_count_window_s"
    )
    confirm_count_window_s: float = Field(
        15.0, gt=0, le=600, description="Within one recording: how close together those windows must start"
    )

    @field_validator("include_species", "exclude_species", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("species_min_confidence", mode="before")
    @classmethod
    def _species_thresholds(cls, value: Any) -> Any:
        """A mapping (YAML) or 'name=threshold, ...' (the environment), kept as sorted pairs: hashable, and
        one analysis id whatever order they were written in."""
        if isinstance(value, str):
            pairs = [part.partition("=") for part in value.split(",") if part.strip()]
            if any(not sep or not name.strip() for name, sep, _ in pairs):
                raise ValueError("expected 'species=threshold' pairs separated by commas")
            value = {name.strip(): threshold.strip() for name, _, threshold in pairs}
        if isinstance(value, dict):
            value = sorted(value.items())
        return value

    @field_validator("species_min_confidence")
    @classmethod
    def _thresholds_in_range(cls, value: tuple[tuple[str, float], ...]) -> tuple[tuple[str, float], ...]:
        for name, threshold in value:
            if not 0.01 <= threshold <= 0.99:
                raise ValueError(f"the threshold of {name!r} must lie within 0.01..0.99, not {threshold}")
        return value

    def threshold_of(self, scientific: str, common: str) -> float:
        """The confidence a detection of this species must exceed."""
        own = {name.lower(): threshold for name, threshold in self.species_min_confidence}
        return own.get(scientific.lower(), own.get(common.lower(), self.min_confidence))

    def lowest_threshold(self) -> float:
        return min([self.min_confidence, *(threshold for _, threshold in self.species_min_confidence)])

    @model_validator(mode="after")
    def _place_is_whole(self):
        if (self.latitude is None) != (self.longitude is None):
            raise ValueError("settings 'latitude' and 'longitude' must be set together")
        return self

    def parameters(self) -> AnalysisParams:
        """Just the parameters (a subclass may carry more, such as how the model runs)."""
        return AnalysisParams(**{name: getattr(self, name) for name in AnalysisParams.model_fields})

    @property
    def analysis_id(self) -> str:
        """Short digest of model version and parameters: rows from different analyses never collide."""
        values = {NAME_IN_DIGEST.get(name, name): getattr(self, name) for name in AnalysisParams.model_fields}
        blob = json.dumps({"model": MODEL_VERSION, **values}, sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def range_week(self, recorded: datetime) -> int | None:
        """The week the range filter uses for a recording, or None when no location is set."""
        if self.latitude is None or self.longitude is None:
            return None
        return week_48(recorded) if self.species_week == 0 else self.species_week


def week_48(day: datetime) -> int:
    """BirdNET's week of the year (1..48), as birdnetlib computes it from a date."""
    day_of_year = day.timetuple().tm_yday
    days_in_year = 366 if calendar.isleap(day.year) else 365
    return math.ceil(day_of_year / days_in_year * 48)
