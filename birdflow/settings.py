"""The one settings object: ``settings.yaml`` (lower-case keys) overridden by upper-case environment variables.

Secrets (tokens, keys) belong in the environment. Booleans are ``true/false`` in YAML and ``0/1`` (or
``true/false``) in the environment; lists are YAML lists or comma-separated environment values.
Invalid values stop the program with a message that names the setting and where it came from.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

SETTINGS_FILE_ENV = "BIRDFLOW_SETTINGS"
LISTENER_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,63}")  # matched in full (fullmatch)


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names it."""


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # identity and places
    station_id: str = Field("station01", description="Name of this aggregator; tags every recording and row")
    data_dir: Path = Field(Path("data"), description="Root of everything birdflow writes on this machine")

    # ingest API
    ingest_host: str = Field("0.0.0.0", description="Address the ingest API binds (listeners must reach it)")
    ingest_port: int = Field(8000, ge=1, le=65535)
    min_duration_s: float = Field(3.0, ge=0, description="Shorter recordings are discarded")
    max_duration_s: float = Field(20.0, gt=0, description="Longer streams roll over into a new recording")
    default_sample_rate: int = Field(48000, ge=8000, le=192000, description="Format of header-less streams")
    default_channels: int = Field(1, ge=1, le=8)
    default_bits_per_sample: Literal[16, 24, 32] = 16
    max_gap_pages: int = Field(9, ge=0, description="Missing pages up to this many are padded with silence")
    max_frame_bytes: int = Field(1 << 20, ge=1024, le=(1 << 24) - 1, description="Larger frames are malformed")
    max_upload_bytes: int = Field(200 << 20, ge=1024, description="Larger uploads are refused with 413")

    # who may send, and what a connection may cost (README, "Security")
    ingest_auth: Literal["off", "on"] = Field(
        "off", description="on: every request needs its listener's token (`birdflow listeners add`); off keeps old listeners working"
    )
    ingest_auth_exempt: list[str] = Field(
        default_factory=list, description="Listener ids that may still send without a token while ingest_auth is on (a migration)"
    )
    metrics_token: SecretStr = Field(
        SecretStr(""), description="Bearer token Prometheus sends for /metrics; empty: /metrics answers loopback only when ingest_auth is on"
    )
    header_timeout_s: float = Field(10.0, gt=0, le=300, description="A request's headers, and a stream's first frame, must arrive within this")
    body_timeout_s: float = Field(30.0, gt=0, le=3600, description="An upload that sends nothing for this long is cut")
    stream_idle_timeout_s: float = Field(
        900.0, gt=0, description="A stream that sends nothing for this long is closed (longer than the listeners' duty-cycle pause)"
    )
    max_open_streams: int = Field(256, ge=1, description="Streams connected at once; more get 503")
    max_streams_per_listener: int = Field(2, ge=1, description="Streams of one listener id at once (a reconnect while the old one lingers); more get 503")
    max_recordings_per_minute: int = Field(
        12, ge=1, description="A stream that starts more recordings than this in a minute is cut (429)"
    )

    # Prefect
    prefect_api_url: str = Field("", description="External Prefect API; empty starts an embedded server")
    prefect_port: int = Field(4200, ge=1, le=65535, description="Port of the embedded Prefect server")
    prefect_database: Literal["sqlite", "postgres"] = Field(
        "sqlite", description="Database of the embedded Prefect server; postgres for stations with many listeners"
    )
    prefect_database_url: SecretStr = Field(
        SecretStr(""), description="An existing Postgres (postgresql+asyncpg://...); empty starts one under data_dir"
    )
    prefect_api_auth_string: SecretStr = Field(
        SecretStr(""), description="user:password of the Prefect server's own auth; every birdflow process sends it"
    )
    prefect_events_enabled: bool = Field(
        False, description="Automations and the stored event feed on the embedded Prefect server (costs CPU per run)"
    )
    postgres_port: int = Field(5433, ge=1, le=65535, description="Loopback port of the Postgres that `up` starts")
    poll_interval_s: float = Field(
        1.0, gt=0, le=60, description="How often the executor looks for runs scheduled from the UI (new files wake it at once)"
    )
    work_pool: str = Field(
        "", description="Work pool of the station's deployments in a fleet (prefect.yaml: birdflow-<station_id>)"
    )
    executor_workers: int = Field(
        2, ge=1, le=16, description="Flow runs executed at once, each thread with its own BirdNET interpreter"
    )
    task_retries: int = Field(3, ge=0, le=20, description="Retries of the I/O tasks (decode, write, archive)")
    retry_delay_s: float = Field(2.0, ge=0, description="First retry delay; doubles on each retry")

    # BirdNET
    birdnet_backend: Literal["auto", "ai-edge-litert", "tflite-runtime"] = "auto"
    birdnet_threads: int = Field(1, ge=1, le=64)
    birdnet_batch_size: int = Field(4, ge=1, le=64, description="3 s windows per interpreter call")
    min_confidence: float = Field(0.25, ge=0.01, le=0.99)
    overlap_s: float = Field(0.0, ge=0.0, lt=3.0, description="Overlap of consecutive 3 s windows")
    sensitivity: float = Field(1.0, ge=0.5, le=1.5)
    latitude: Optional[float] = Field(None, ge=-90, le=90)
    longitude: Optional[float] = Field(None, ge=-180, le=180)
    species_week: int = Field(0, ge=-1, le=48, description="Range filter week: 0 from the recording date, -1 all year")
    range_filter_threshold: float = Field(0.03, gt=0, lt=1)
    include_species: list[str] = Field(default_factory=list, description="Only these (scientific or common names)")
    exclude_species: list[str] = Field(default_factory=list, description="Never these")

    # detection sinks
    parquet_enabled: bool = True
    influx_enabled: bool = False
    influx_host: str = ""
    influx_database: str = "birdflow"
    influx_table: str = "detections"
    influx_token: SecretStr = SecretStr("")

    # archive and backfill
    backfill_roots: list[Path] = Field(
        default_factory=list,
        description="Folders a backfill may read besides the station's own data and archive; flow runs read no audio elsewhere",
    )
    archive_backend: Literal["local", "s3"] = "local"
    archive_dir: Optional[Path] = Field(None, description="Local archive root; default <data_dir>/archive")
    s3_bucket: str = ""
    s3_prefix: str = ""
    s3_endpoint_url: str = ""
    s3_region: str = "us-east-1"
    aws_access_key_id: str = ""
    aws_secret_access_key: SecretStr = SecretStr("")
    s3_block_name: str = "birdflow-archive"
    archive_format: Literal["wav", "flac"] = Field(
        "flac", description="WAV recordings are archived as lossless FLAC (verified to decode to identical PCM) or as sent"
    )
    keep_local_recordings: bool = Field(
        False, description="With an S3 archive, also keep a local copy in the local archive (subject to its retention)"
    )

    # running unattended: re-drive of failed runs, the disk floor, retention
    redrive_delays_s: list[float] = Field(
        default_factory=lambda: [60.0, 120.0, 300.0, 900.0, 3600.0],
        description="Waits before each automatic re-run of a failed recording's run; the last one repeats",
    )
    redrive_max_age_days: float = Field(
        7.0, gt=0, description="A recording whose run still fails this long after it arrived is given up (audio kept)"
    )
    maintenance_interval_s: float = Field(
        600.0, ge=10, description="How often the executor runs the maintenance deployment (re-drive sweep, retention, compaction)"
    )
    min_free_disk_mb: int = Field(
        500, ge=0, description="Below this free space retention runs at once, then new recordings are refused (507)"
    )
    run_retention_days: float = Field(
        14.0, gt=1 / 24, description="Flow runs (task runs, logs, artifacts) and cached results older than this are deleted"
    )
    local_archive_max_gb: float = Field(0.0, ge=0, description="Cap of the local archive, oldest first; 0: no cap")
    local_archive_max_days: float = Field(0.0, ge=0, description="Age limit of the local archive; 0: no limit")
    local_archive_purge_at_floor: bool = Field(
        True, description="At the disk floor, delete the oldest local archive audio even when it is the only copy"
    )

    # Prometheus agent (scrapes this station, remote-writes to the central Prometheus)
    prometheus_scrape_interval_s: int = Field(15, ge=1, le=3600)
    prometheus_remote_write_url: str = Field("", description="Central Prometheus /api/v1/write; empty: none")
    prometheus_remote_write_user: str = ""
    prometheus_remote_write_password: SecretStr = SecretStr("")

    @field_validator("station_id")
    @classmethod
    def _station_id_is_a_safe_name(cls, value: str) -> str:
        if not LISTENER_ID_PATTERN.fullmatch(value):
            raise ValueError("letters, digits, '.' and '-' only (1-64 characters)")
        return value

    @field_validator("ingest_auth_exempt")
    @classmethod
    def _exempt_ids_are_listener_ids(cls, value: list[str]) -> list[str]:
        for listener_id in value:
            validate_listener_id(listener_id)
        return value

    @field_validator("include_species", "exclude_species", "redrive_delays_s", "ingest_auth_exempt", "backfill_roots", mode="before")
    @classmethod
    def _split_comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("redrive_delays_s")
    @classmethod
    def _positive_delays(cls, value: list[float]) -> list[float]:
        if not value or any(delay <= 0 for delay in value):
            raise ValueError("give one or more positive delays in seconds, e.g. 60,120,300,900,3600")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        if self.max_duration_s <= self.min_duration_s:
            raise SettingsError(
                f"setting 'max_duration_s' ({self.max_duration_s}) must be greater than "
                f"'min_duration_s' ({self.min_duration_s})"
            )
        if (self.latitude is None) != (self.longitude is None):
            raise SettingsError("settings 'latitude' and 'longitude' must be set together")
        if self.influx_enabled and not self.influx_host:
            raise SettingsError("setting 'influx_host' is required when 'influx_enabled' is true")
        if self.archive_backend == "s3" and not self.s3_bucket:
            raise SettingsError("setting 's3_bucket' is required when 'archive_backend' is 's3'")
        if not self.parquet_enabled and not self.influx_enabled:
            raise SettingsError("enable at least one detection sink ('parquet_enabled' or 'influx_enabled')")
        return self

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
    def results_file(self) -> Path:
        """The analyze task's cached results (one SQLite file, not a file per result)."""
        return self.state_dir / "results.sqlite"

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
        return [self.recordings_dir, self.failed_dir, self.backfill_scratch_dir, self.local_archive_dir, *self.backfill_roots]

    @property
    def detections_dir(self) -> Path:
        return self.data_dir / "detections"

    @property
    def local_archive_dir(self) -> Path:
        return self.archive_dir or self.data_dir / "archive"

    @property
    def prefect_home(self) -> Path:
        return self.data_dir / "prefect"

    @property
    def prefect_database_file(self) -> Path:
        """The embedded Prefect server's SQLite database."""
        return self.prefect_home / "prefect.db"

    @property
    def metrics_dir(self) -> Path:
        """Shared by all birdflow processes so one /metrics shows them all."""
        return self.data_dir / "metrics"

    @property
    def api_url(self) -> str:
        return self.prefect_api_url or f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def embedded_prefect(self) -> bool:
        return not self.prefect_api_url


def _env_value(field_name: str, raw: str, annotation: Any) -> Any:
    """Environment values are strings; booleans are "0"/"1" (as field devices write them) or true/false."""
    if annotation is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise SettingsError(f"setting '{field_name}' (env {field_name.upper()}): expected 0/1 or true/false, got {raw!r}")
    if raw == "" and field_name in ("latitude", "longitude", "archive_dir"):
        return None
    return raw


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a .env file (comments, blank lines and `export ` allowed; quotes stripped)."""
    values = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"{path}, line {number}: expected KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def load_settings(path: Optional[os.PathLike | str] = None, environ: Optional[Mapping[str, str]] = None) -> Settings:
    """Read settings.yaml (if any) and apply upper-case environment overrides, validating everything.

    A `.env` file in the working directory counts as environment (the real environment wins)."""
    if environ is None:
        environ = {**(read_env_file(Path(".env")) if Path(".env").is_file() else {}), **os.environ}
    path = path or environ.get(SETTINGS_FILE_ENV)
    values: dict[str, Any] = {}
    source: dict[str, str] = {}
    if path is None and Path("settings.yaml").is_file():
        path = "settings.yaml"
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise SettingsError(f"settings file {file} does not exist")
        try:
            loaded = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise SettingsError(f"settings file {file} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise SettingsError(f"settings file {file} must be a mapping of setting: value")
        for key, value in loaded.items():
            values[str(key)] = value
            source[str(key)] = f"in {file}"
    for name, field in Settings.model_fields.items():
        env_name = name.upper()
        if env_name in environ:
            values[name] = _env_value(name, environ[env_name], field.annotation)
            source[name] = f"env {env_name}"
    try:
        return Settings(**values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            message = error["msg"].removeprefix("Value error, ")
            if not error["loc"]:
                problems.append(message)
                continue
            name = ".".join(str(part) for part in error["loc"])
            where = source.get(name.split(".")[0], "default")
            if error["type"] == "extra_forbidden":
                message = "unknown setting (see settings.example.yaml for the valid names)"
            problems.append(f"setting '{name}' ({where}): {message}")
        raise SettingsError("; ".join(problems)) from None


def validate_listener_id(listener_id: str) -> str:
    """Listener ids become file names: refuse anything that could name another path."""
    if not LISTENER_ID_PATTERN.fullmatch(listener_id or ""):
        raise ValueError(
            f"invalid listener id {listener_id!r}: use 1-64 letters, digits, '.' or '-' (no '/', '_', '..' or NUL)"
        )
    if ".." in listener_id:
        raise ValueError(f"invalid listener id {listener_id!r}: '..' is not allowed")
    return listener_id
