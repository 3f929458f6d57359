"""What a flow-executing process builds once and keeps: settings, the BirdNET model, sinks and archive.

A flow body obtains them once (`run_resources()`) and hands the tasks what they need; nothing else
in the flows reaches for process-wide state.
"""

from __future__ import annotations

import sys
import threading
from datetime import datetime, timezone
from functools import cached_property

import pyarrow as pa

from birdflow.core.analysis import MODEL_VERSION, AnalysisParams
from birdflow.core.archive import Archive, LocalArchive
from birdflow.core.birdnet import BirdNET
from birdflow.core.central_link import CentralLink
from birdflow.core.clips import ClipIndex
from birdflow.core.ledger import ProcessedLedger
from birdflow.core.mqtt_state import MqttState
from birdflow.core.outbox import Outbox
from birdflow.core.rarity import HOURLY_SCHEMA, SpeciesRecord
from birdflow.core.results import ResultsDatabase
from birdflow.core.reviews import ReviewStore
from birdflow.core.sinks import DetectionSink, InfluxSink, ParquetSink, read_hour
from birdflow.runtime.mqtt import outbox_of
from birdflow.runtime.state_files import processed_ledger
from birdflow.settings import Settings, SettingsError, load_settings


def arrow_without_pandas_probe() -> None:
    """pyarrow imports pandas (~45 MB of memory) the first time it converts Python values, only to ask
    whether they are pandas objects, which the station's never are. That first look is made to find no
    pandas; what really needs pandas (`to_pandas()`, the InfluxDB sink) still imports it then."""
    if "pandas" in sys.modules:
        return
    blocker = _NoPandas()
    sys.meta_path.insert(0, blocker)
    try:
        pa.array([0])
    finally:
        sys.meta_path.remove(blocker)


class _NoPandas:
    def find_spec(self, name, path=None, target=None):
        if name == "pandas":
            raise ImportError("pandas is not looked at for plain Python values")
        return None


class RunResources:
    """A plain class, not a dataclass: Prefect passes it to tasks as it is, without walking its fields."""

    def __init__(self, settings: Settings):
        arrow_without_pandas_probe()
        self.settings = settings
        self._model: BirdNET | None = None
        self._model_lock = threading.Lock()

    @cached_property
    def params(self) -> AnalysisParams:
        return self.settings.analysis.parameters()

    @property
    def model(self) -> BirdNET:
        """One BirdNET for all the process's runs (its interpreters shared between them), loaded on first use."""
        with self._model_lock:
            if self._model is None:
                analysis = self.settings.analysis
                model = BirdNET(
                    analysis.birdnet_backend,
                    analysis.birdnet_threads,
                    analysis.birdnet_batch_size,
                    analysis.interpreters,
                    self.settings.onnx_model_file,
                )
                model.warm_up()
                unknown = model.unknown_species(self.params)
                if unknown:
                    raise SettingsError(
                        f"settings 'include_species', 'exclude_species' or 'species_min_confidence' name "
                        f"{', '.join(repr(name) for name in unknown)}, no species of {MODEL_VERSION} "
                        "(scientific or common names as in its labels)"
                    )
                self._model = model
            return self._model

    @cached_property
    def sinks(self) -> list[DetectionSink]:
        settings = self.settings
        sinks: list[DetectionSink] = []
        if self.settings.sinks.parquet_enabled:
            sinks.append(ParquetSink.in_folders(settings.table_folders))
        if self.settings.sinks.influx_enabled:
            from birdflow.blocks import load_influx

            block = load_influx(self.settings)
            sinks.append(
                InfluxSink(
                    block.host,
                    block.database,
                    block.table,
                    block.token.get_secret_value(),
                    self.settings.detections.influx_hourly_table,
                )
            )
        return sinks

    @cached_property
    def archive(self) -> Archive:
        if self.settings.archive.archive_backend == "s3":
            from birdflow.blocks import archive_in_bucket, load_s3_bucket

            return archive_in_bucket(load_s3_bucket(self.settings))
        return LocalArchive(self.settings.local_archive_dir)

    @cached_property
    def local_copy(self) -> LocalArchive | None:
        """With an S3 archive and keep_local_recordings: the local archive keeps a copy too."""
        if self.settings.archive.archive_backend == "s3" and self.settings.archive.keep_local_recordings:
            return LocalArchive(self.settings.local_archive_dir)
        return None

    @cached_property
    def outbox(self) -> Outbox | None:
        """Messages for the MQTT broker (None while mqtt_host is empty); the executor publishes them."""
        return outbox_of(self.settings)

    @cached_property
    def mqtt_state(self) -> MqttState:
        """What the broker was told (discovery configs, what each retained topic shows); with the outbox."""
        return MqttState(self.settings.mqtt_state_file)

    @cached_property
    def central_link(self) -> CentralLink | None:
        """What goes to the fleet's central Prefect (None without central_api_url); `birdflow relay` sends it."""
        return CentralLink(self.settings.central_link_file) if self.settings.prefect.central_api_url else None

    @cached_property
    def ledger(self) -> ProcessedLedger:
        return processed_ledger(self.settings)

    @cached_property
    def species(self) -> SpeciesRecord:
        detections = self.settings.detections
        return SpeciesRecord(self.settings.species_file, detections.rare_window_days, detections.watch_species)

    @cached_property
    def reviews(self) -> ReviewStore:
        return ReviewStore(self.settings.reviews_file)

    @cached_property
    def clips(self) -> ClipIndex:
        return ClipIndex(self.settings.clips_file, self.settings.detections.clips_per_species_per_day)

    def check_state_files(self) -> None:
        """Open each state file the runs write, so that a damaged one is found and rebuilt when the process starts
        rather than by the first run that meets it (core/local_db.py)."""
        results = ResultsDatabase(self.settings.results_file)
        databases = [self.ledger.database, self.species.database, self.reviews.database, self.clips.database]
        databases.append(results.database)
        if self.outbox is not None:
            databases += [self.outbox.database, self.mqtt_state.database]
        if self.central_link is not None:
            databases.append(self.central_link.database)
        for database in databases:
            database.execute("SELECT 1")

    def hour_written(self, hour: int, station_id: str) -> pa.Table:
        """An hour of counts as written before (a late recording adds to it); only Parquet can be read back."""
        if not self.settings.sinks.parquet_enabled:
            return HOURLY_SCHEMA.empty_table()
        return read_hour(self.settings.species_hourly_dir, datetime.fromtimestamp(hour, timezone.utc))

    @cached_property
    def result_storage(self):
        """The station's results file as a Prefect block, saved once per process (Prefect takes only saved blocks)."""
        from birdflow.blocks import SQLiteResultStorage

        storage = SQLiteResultStorage(path=str(self.settings.results_file.resolve()))
        storage.save(f"birdflow-results-{self.settings.station_id}", overwrite=True)
        return storage


_current: RunResources | None = None
_current_lock = threading.Lock()


def run_resources() -> RunResources:
    """This process's resources, built from the settings on first use (any process can run the flows)."""
    global _current
    with _current_lock:
        if _current is None:
            _current = RunResources(load_settings())
        return _current


def use_run_resources(settings: Settings) -> RunResources:
    """Install the resources of these settings (the executor, worker and CLI do this once at start)."""
    global _current
    with _current_lock:
        _current = RunResources(settings)
        return _current
