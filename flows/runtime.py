"""What a flow-executing process builds once and keeps: settings, the BirdNET model, sinks and archive."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional

from birdflow.archive import Archive, LocalArchive, S3Archive
from birdflow.birdnet import AnalysisParams, BirdNET
from birdflow.ledger import ProcessedLedger
from birdflow.settings import Settings, load_settings
from birdflow.sinks import DetectionSink, InfluxSink, ParquetSink


def analysis_params(settings: Settings) -> AnalysisParams:
    return AnalysisParams(
        min_confidence=settings.min_confidence,
        overlap_s=settings.overlap_s,
        sensitivity=settings.sensitivity,
        latitude=settings.latitude,
        longitude=settings.longitude,
        species_week=settings.species_week,
        range_filter_threshold=settings.range_filter_threshold,
        include_species=tuple(settings.include_species),
        exclude_species=tuple(settings.exclude_species),
    )


@dataclass
class Pipeline:
    settings: Settings
    _per_thread: threading.local = field(default_factory=threading.local, repr=False)

    @cached_property
    def params(self) -> AnalysisParams:
        return analysis_params(self.settings)

    @property
    def model(self) -> BirdNET:
        """One interpreter per executing thread (interpreters are not thread-safe), loaded on first use."""
        model = getattr(self._per_thread, "model", None)
        if model is None:
            settings = self.settings
            model = self._per_thread.model = BirdNET(
                settings.birdnet_backend, settings.birdnet_threads, settings.birdnet_batch_size
            )
        return model

    @cached_property
    def sinks(self) -> list[DetectionSink]:
        sinks: list[DetectionSink] = []
        if self.settings.parquet_enabled:
            sinks.append(ParquetSink(self.settings.detections_dir))
        if self.settings.influx_enabled:
            from blocks import load_influx

            block = load_influx(self.settings)
            sinks.append(InfluxSink(block.host, block.database, block.table, block.token.get_secret_value()))
        return sinks

    @cached_property
    def archive(self) -> Archive:
        if self.settings.archive_backend == "s3":
            from blocks import load_s3_bucket

            return S3Archive(load_s3_bucket(self.settings))
        return LocalArchive(self.settings.local_archive_dir)

    @cached_property
    def local_copy(self) -> Optional[LocalArchive]:
        """With an S3 archive and keep_local_recordings: the local archive keeps a copy too."""
        if self.settings.archive_backend == "s3" and self.settings.keep_local_recordings:
            return LocalArchive(self.settings.local_archive_dir)
        return None

    @cached_property
    def ledger(self) -> ProcessedLedger:
        return ProcessedLedger(self.settings.processed_record_file)

    @cached_property
    def result_storage(self):
        """The station's results file as a Prefect block, saved once per process (Prefect takes only saved blocks)."""
        from blocks import SQLiteResultStorage

        storage = SQLiteResultStorage(path=str(self.settings.results_file.resolve()))
        storage.save(f"birdflow-results-{self.settings.station_id}", overwrite=True)
        return storage


_current: Optional[Pipeline] = None
_current_lock = threading.Lock()


def pipeline() -> Pipeline:
    """The process-wide pipeline, built from the settings on first use (any process can run the flow)."""
    global _current
    with _current_lock:
        if _current is None:
            _current = Pipeline(load_settings())
        return _current


def use_settings(settings: Settings) -> Pipeline:
    """Install a pipeline for these settings (the executor does this once at start)."""
    global _current
    with _current_lock:
        _current = Pipeline(settings)
        return _current
