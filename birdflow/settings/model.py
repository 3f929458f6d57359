"""The one settings object: the station's identity and data folder, its sections, and the places derived
from them. Built from flat names (`Settings(min_duration_s=1)`, as settings.yaml and the environment give
them) or from sections (`Settings(ingest={...})`)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.fields import FieldInfo

from birdflow.core.analysis import MODEL_VERSION
from birdflow.core.budget import MB, HistoryBudget, derived_budget_bytes
from birdflow.core.listener_ids import LISTENER_ID_PATTERN
from birdflow.core.table_folders import TableFolders
from birdflow.settings.sections import (
    AnalysisSettings,
    ArchiveSettings,
    DetectionSettings,
    ExportSettings,
    IngestSettings,
    MqttSettings,
    ObservabilitySettings,
    PrefectSettings,
    SinkSettings,
    UnattendedSettings,
)

SECTIONS: dict[str, type[BaseModel]] = {
    "ingest": IngestSettings,
    "prefect": PrefectSettings,
    "analysis": AnalysisSettings,
    "sinks": SinkSettings,
    "detections": DetectionSettings,
    "archive": ArchiveSettings,
    "exports": ExportSettings,
    "unattended": UnattendedSettings,
    "observability": ObservabilitySettings,
    "mqtt": MqttSettings,
}
# flat setting name -> its section
SECTION_OF = {name: section for section, model in SECTIONS.items() for name in model.model_fields}


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    station_id: str = Field("station01", description="Name of this aggregator; tags every recording and row")
    data_dir: Path = Field(Path("data"), description="Root of everything birdflow writes on this machine")
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    prefect: PrefectSettings = Field(default_factory=PrefectSettings)
    analysis: AnalysisSettings = Field(default_factory=AnalysisSettings)
    sinks: SinkSettings = Field(default_factory=SinkSettings)
    detections: DetectionSettings = Field(default_factory=DetectionSettings)
    archive: ArchiveSettings = Field(default_factory=ArchiveSettings)
    exports: ExportSettings = Field(default_factory=ExportSettings)
    unattended: UnattendedSettings = Field(default_factory=UnattendedSettings)
    observability: ObservabilitySettings = Field(default_factory=ObservabilitySettings)
    mqtt: MqttSettings = Field(default_factory=MqttSettings)

    @model_validator(mode="before")
    @classmethod
    def _flat_names_into_sections(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        nested: dict[str, Any] = {}
        for name, value in values.items():
            section = SECTION_OF.get(name)
            if section is None:
                nested[name] = value
            else:
                nested.setdefault(section, {})
                if isinstance(nested[section], dict):
                    nested[section][name] = value
        return nested

    @field_validator("station_id")
    @classmethod
    def _station_id_is_a_safe_name(cls, value: str) -> str:
        if not LISTENER_ID_PATTERN.fullmatch(value):
            raise ValueError("letters, digits, '.' and '-' only (1-64 characters)")
        return value

    @classmethod
    def flat_fields(cls) -> dict[str, FieldInfo]:
        """Every setting by its flat name (the settings.yaml key; in upper case, the environment variable)."""
        top = {name: field for name, field in cls.model_fields.items() if name not in SECTIONS}
        return top | {name: SECTIONS[section].model_fields[name] for name, section in SECTION_OF.items()}

    # derived places
    @property
    def recordings_dir(self) -> Path:
        """Finished recordings waiting for (or in) their flow run."""
        return self.data_dir / "recordings"

    @property
    def partial_dir(self) -> Path:
        """Recordings being assembled; moved atomically into recordings_dir when closed."""
        return self.data_dir / "partial"

    @property
    def failed_dir(self) -> Path:
        """Recordings given up on (undecodable, or failing past redrive_max_age): kept for a human or a backfill."""
        return self.data_dir / "failed"

    @property
    def staging_dir(self) -> Path:
        """FLAC copies being made and checked before they go to the archive."""
        return self.data_dir / "staging"

    @property
    def state_dir(self) -> Path:
        """birdflow's own small databases: the processed-recordings record and the cached task results."""
        return self.data_dir / "state"

    @property
    def processed_record_file(self) -> Path:
        return self.state_dir / "processed.sqlite"

    @property
    def purge_journal_file(self) -> Path:
        """Archived audio deleted and not yet announced as Prefect events (birdflow.core.retention)."""
        return self.state_dir / "purged.jsonl"

    @property
    def results_file(self) -> Path:
        """The analyze task's cached results (one SQLite file, not a file per result)."""
        return self.state_dir / "results.sqlite"

    @property
    def species_file(self) -> Path:
        """When each species was last heard, the hourly counts not yet written, which recordings were counted."""
        return self.state_dir / "species.sqlite"

    @property
    def clips_file(self) -> Path:
        """The clips kept per species and day (which to delete when better ones come)."""
        return self.state_dir / "clips.sqlite"

    @property
    def reviews_file(self) -> Path:
        """The detections asked to be reviewed and the verdicts given (birdflow.core.reviews)."""
        return self.state_dir / "reviews.sqlite"

    @property
    def link_key_file(self) -> Path:
        """The key that signs the links a browser opens without a token (birdflow.core.links)."""
        return self.state_dir / "links.key"

    @property
    def central_link_file(self) -> Path:
        """Rare-species events waiting for the central Prefect, and the hours summarised there (flows/relay.py)."""
        return self.state_dir / "central_link.sqlite"

    @property
    def mqtt_outbox_file(self) -> Path:
        """Messages waiting for the MQTT broker (birdflow.core.outbox)."""
        return self.state_dir / "mqtt_outbox.sqlite"

    @property
    def mqtt_state_file(self) -> Path:
        """What the broker was told and must keep: discovery configs, the detections retained topics show
        (birdflow.core.mqtt_state)."""
        return self.state_dir / "mqtt_state.sqlite"

    @property
    def mqtt_publisher_lock_file(self) -> Path:
        """Held by the one process of the station that publishes to MQTT (the executor, or a worker)."""
        return self.state_dir / "mqtt-publisher.lock"

    @property
    def listener_tokens_file(self) -> Path:
        """Hashes of the listeners' tokens (never the tokens)."""
        return self.state_dir / "listeners.sqlite"

    @property
    def backfill_scratch_dir(self) -> Path:
        """Objects a backfill downloads from S3, each for as long as it is processed."""
        return self.data_dir / "backfill"

    @property
    def audio_roots(self) -> list[Path]:
        """The only folders a flow run reads audio from."""
        return [
            self.recordings_dir,
            self.failed_dir,
            self.backfill_scratch_dir,
            self.local_archive_dir,
            *self.archive.backfill_roots,
        ]

    @property
    def detections_dir(self) -> Path:
        return self.data_dir / "detections"

    @property
    def species_hourly_dir(self) -> Path:
        """Hourly counts per listener and species, one Parquet file per hour."""
        return self.data_dir / "species_hourly"

    @property
    def reviews_dir(self) -> Path:
        """The reviews table: the verdicts on one day's detections in one Parquet file, rewritten on each verdict."""
        return self.data_dir / "reviews"

    @property
    def health_spool_dir(self) -> Path:
        """Listener health reports as the ingest received them (JSON lines), until maintenance tables them."""
        return self.data_dir / "health_spool"

    @property
    def listener_health_dir(self) -> Path:
        """The listener_health table, one Parquet file per maintenance run."""
        return self.data_dir / "listener_health"

    @property
    def executor_threads(self) -> int:
        """Flow-run threads of a process that executes runs (the executor, a worker): one more than the
        interpreters, so that the model keeps working while a run decodes, writes or archives."""
        return self.prefect.executor_workers or self.analysis.interpreters + 1

    @property
    def onnx_model_file(self) -> Path:
        """BirdNET converted to ONNX (`birdflow model convert`; made on first use where the converter is)."""
        folder = self.analysis.birdnet_model_dir or self.data_dir / "models"
        return folder / f"{MODEL_VERSION}_FP32.onnx"

    @property
    def table_folders(self) -> TableFolders:
        return TableFolders(self.detections_dir, self.species_hourly_dir, self.listener_health_dir, self.reviews_dir)

    @property
    def local_archive_dir(self) -> Path:
        return self.archive.archive_dir or self.data_dir / "archive"

    @property
    def prefect_home(self) -> Path:
        return self.data_dir / "prefect"

    @property
    def prefect_database_file(self) -> Path:
        """The embedded Prefect server's SQLite database."""
        return self.prefect_home / "prefect.db"

    def history_budget(self) -> HistoryBudget:
        """The disk budget of run history and state: history_budget_mb, or a share of the data disk."""
        disk = self.data_dir
        while not disk.exists() and disk != disk.parent:
            disk = disk.parent
        chosen = int(self.unattended.history_budget_mb * MB)
        return HistoryBudget(
            chosen or derived_budget_bytes(shutil.disk_usage(disk).total), self.unattended.min_free_disk_mb * MB
        )

    @property
    def metrics_dir(self) -> Path:
        """Shared by all birdflow processes so one /metrics shows them all."""
        return self.data_dir / "metrics"

    @property
    def api_url(self) -> str:
        return self.prefect.prefect_api_url or f"http://127.0.0.1:{self.prefect.prefect_port}/api"

    @property
    def local_ingest_address(self) -> str:
        """host:port at which this machine reaches the ingest API (a wildcard bind, on loopback)."""
        host = self.ingest.ingest_host
        host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else f"[{host}]" if ":" in host else host
        return f"{host}:{self.ingest.ingest_port}"

    @property
    def station_url(self) -> str:
        """Where browsers reach the ingest API: public_url, else the station's own address on this machine."""
        return self.ingest.public_url or f"http://{self.local_ingest_address}"

    @property
    def embedded_prefect(self) -> bool:
        return not self.prefect.prefect_api_url

    @property
    def matches_sightings_on_its_prefect(self) -> bool:
        """Whether its runs look for a confirmation of their rare sightings on their Prefect server: one the fleet
        shares (every run central), or its embedded one when that stores its event feed; a station with
        central_api_url leaves it to its relay."""
        if self.prefect.central_api_url:
            return False
        return not self.embedded_prefect or self.prefect.prefect_events_enabled
