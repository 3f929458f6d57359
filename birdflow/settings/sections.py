"""The sections of the settings: each a small typed model whose fields keep the flat names that
settings.yaml and the environment use (INGEST_PORT sets `ingest.ingest_port`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from birdflow.core.analysis import AnalysisParams
from birdflow.core.errors import SettingsError
from birdflow.core.listener_ids import validate_listener_id


def crosses_the_network_in_clear(url: str) -> bool:
    """An http:// address whose host is not this machine's loopback."""
    from ipaddress import ip_address
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme != "http":
        return False
    host = parts.hostname or ""
    if host == "localhost":
        return False
    try:
        return not ip_address(host).is_loopback
    except ValueError:
        return True


def comma_list(value: Any) -> Any:
    """Lists are YAML lists or comma-separated environment values."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def yaml_switch(value: Any) -> Any:
    """YAML 1.1 reads a bare `on` or `off` as a boolean: taken back as the word the user wrote."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return value


def web_address(value: Any) -> Any:
    """An address people open in a browser: http(s)://host[:port][/path], without a query; empty is unset."""
    from urllib.parse import urlsplit

    if not isinstance(value, str) or not value.strip():
        return value
    value = value.strip().rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"expected http(s)://host[:port][/path], got {value!r}")
    return value


WebAddress = Annotated[str, BeforeValidator(web_address)]
Names = Annotated[list[str], BeforeValidator(comma_list)]
Seconds = Annotated[list[float], BeforeValidator(comma_list)]
Folders = Annotated[list[Path], BeforeValidator(comma_list)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class IngestSettings(Section):
    """The listener protocol's endpoints, and what one connection may cost (docs/security.md)."""

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
    max_upload_duration_s: float = Field(
        7200.0,
        gt=0,
        description="Longer uploaded recordings are refused with 422 (an AudioMoth's hour-long files fit; "
        "backfill takes any length)",
    )
    ingest_auth: Annotated[Literal["off", "on"], BeforeValidator(yaml_switch)] = Field(
        "off",
        description=(
            "on: every request needs its listener's token (`birdflow listeners add`); off keeps old listeners working"
        ),
    )
    ingest_auth_exempt: Names = Field(
        default_factory=list,
        description="Listener ids that may still send without a token while ingest_auth is on (a migration)",
    )
    header_timeout_s: float = Field(
        10.0, gt=0, le=300, description="A request's headers, and a stream's first frame, must arrive within this"
    )
    body_timeout_s: float = Field(30.0, gt=0, le=3600, description="An upload that sends nothing for this long is cut")
    stream_idle_timeout_s: float = Field(
        900.0,
        gt=0,
        description="A stream that sends nothing for this long is closed (longer than the listeners' duty-cycle pause)",
    )
    max_open_streams: int = Field(256, ge=1, description="Streams connected at once; more get 503")
    max_stream_lifetime_s: float = Field(
        86400.0,
        gt=0,
        description="A stream connected longer than this is ended at its next recording (503; the "
        "listener reconnects, and its token is checked again)",
    )
    max_open_uploads: int = Field(32, ge=1, description="Uploads in progress at once; more get 503")
    max_uploads_per_listener: int = Field(
        2, ge=1, description="Uploads of one listener id in progress at once; more get 503"
    )
    min_upload_bytes_per_s: int = Field(
        4096,
        ge=0,
        description=(
            "An upload slower than this on average, once body_timeout_s has passed, is cut (408); 0: no minimum"
        ),
    )
    max_streams_per_listener: int = Field(
        2, ge=1, description="Streams of one listener id at once (a reconnect while the old one lingers); more get 503"
    )
    max_recordings_per_minute: int = Field(
        12, ge=1, description="A stream that starts more recordings than this in a minute is cut (429)"
    )
    max_backlog_uploads_per_minute: int = Field(
        120,
        ge=1,
        description=(
            "Uploads a listener may make in a minute of recordings that ended over 10 minutes ago (its backlog, "
            "a card sent after days offline), counted apart from max_recordings_per_minute; more get 429"
        ),
    )
    public_url: WebAddress = Field(
        "",
        description=(
            "How people's browsers reach this station's ingest API (https://pi.example.org:8000): the clip links of "
            "review forms; empty: http://127.0.0.1:<ingest_port>, which opens on the station only"
        ),
    )
    health_port: int = Field(
        6000, ge=0, le=65535, description="UDP port of listener health datagrams (docs/listener-protocol.md); 0: off"
    )
    health_min_interval_s: float = Field(
        10.0, ge=0, description="A listener's health is taken at most this often; more is counted and dropped"
    )
    health_max_listeners: int = Field(
        1000, ge=1, le=100000, description="Listeners whose health is tracked at once (bounds memory and metrics)"
    )

    @field_validator("ingest_auth_exempt")
    @classmethod
    def _exempt_ids_are_listener_ids(cls, value: list[str]) -> list[str]:
        for listener_id in value:
            validate_listener_id(listener_id)
        return value

    @model_validator(mode="after")
    def _durations(self) -> IngestSettings:
        if self.max_duration_s <= self.min_duration_s:
            raise SettingsError(
                f"setting 'max_duration_s' ({self.max_duration_s}) must be greater than "
                f"'min_duration_s' ({self.min_duration_s})"
            )
        return self


class PrefectSettings(Section):
    """The Prefect API the station uses (or the embedded server it starts) and how runs execute."""

    prefect_api_url: str = Field("", description="External Prefect API; empty starts an embedded server")
    prefect_api_auth_string: SecretStr = Field(
        SecretStr(""), description="user:password of the Prefect server's own auth; every birdflow process sends it"
    )
    central_api_url: str = Field(
        "",
        description=(
            "A fleet's central Prefect API while this station keeps its run history on its own server (the embedded "
            "one): the central one gets a summary run per hour and the rare-species events (`birdflow relay`)"
        ),
    )
    central_api_auth_string: SecretStr = Field(
        SecretStr(""), description="user:password of the central Prefect server's auth (with 'central_api_url')"
    )
    public_ui_url: WebAddress = Field(
        "",
        description=(
            "How people reach the Prefect UI that shows this station's runs (https://prefect.example.org): the run "
            "links of notifications and logs; empty: the UI at the Prefect API's own address"
        ),
    )
    prefect_port: int = Field(4200, ge=1, le=65535, description="Port of the embedded Prefect server")
    prefect_database: Literal["sqlite", "postgres"] = Field(
        "sqlite", description="Database of the embedded Prefect server; postgres for stations with many listeners"
    )
    prefect_database_url: SecretStr = Field(
        SecretStr(""), description="An existing Postgres (postgresql+asyncpg://...); empty starts one under data_dir"
    )
    prefect_events_enabled: bool = Field(
        False, description="Automations and the stored event feed on the embedded Prefect server (costs CPU per run)"
    )
    postgres_port: int = Field(5433, ge=1, le=65535, description="Loopback port of the Postgres that `up` starts")
    poll_interval_s: float = Field(
        1.0,
        gt=0,
        le=60,
        description="How often the executor looks for runs scheduled from the UI (new files wake it at once)",
    )
    work_pool: str = Field(
        "", description="Work pool of the station's deployments in a fleet (prefect.yaml: birdflow-<station_id>)"
    )
    executor_workers: int = Field(
        0,
        ge=0,
        le=16,
        description=(
            "Flow runs executed at once, 0: one more than the BirdNET interpreters (so that the model keeps working"
            " while a run decodes, writes or archives)"
        ),
    )
    task_retries: int = Field(
        3, ge=0, le=20, description="Retries of the I/O tasks (write detections, archive, a fetch from the archive)"
    )
    retry_delay_s: float = Field(2.0, ge=0, description="First retry delay; doubles on each retry")

    allow_plain_http_api: bool = Field(
        False,
        description=(
            "Let a Prefect auth string go over plain http:// to a host that is not this machine (a private network "
            "you trust, such as one host's container network); otherwise refused at start: use https://"
        ),
    )

    @model_validator(mode="after")
    def _no_password_in_clear(self) -> PrefectSettings:
        for url_name, auth_name in (
            ("prefect_api_url", "prefect_api_auth_string"),
            ("central_api_url", "central_api_auth_string"),
        ):
            url = getattr(self, url_name)
            if url and getattr(self, auth_name).get_secret_value() and not self.allow_plain_http_api:
                if crosses_the_network_in_clear(url):
                    raise SettingsError(
                        f"setting '{url_name}' is {url}: the password in '{auth_name}' would cross the network in "
                        'clear. Serve that Prefect API over https:// (docs/fleet.md, "TLS") and name it so, or set '
                        "'allow_plain_http_api: true' on a private network you trust"
                    )
        return self

    @model_validator(mode="after")
    def _central_is_another_server(self) -> PrefectSettings:
        if self.central_api_url and self.central_api_url.rstrip("/") == self.prefect_api_url.rstrip("/"):
            raise SettingsError(
                "setting 'central_api_url' names the station's own Prefect API: it is for a fleet's central server "
                "while the station keeps its runs on a server of its own (leave it empty to run everything centrally)"
            )
        return self


def default_interpreters(cores: int) -> int:
    """The model on every core of a small machine; on 4 cores or more, one core is left to the rest (decoding,
    ingest, the Prefect server), which would otherwise wait behind the model."""
    return cores if cores <= 2 else cores - 1


class AnalysisSettings(AnalysisParams):
    """BirdNET: how the model runs, and the analysis parameters (which are part of every cache key)."""

    model_config = ConfigDict(frozen=False, extra="forbid", validate_assignment=True)

    birdnet_backend: Literal["auto", "onnxruntime", "ai-edge-litert", "tflite-runtime"] = Field(
        "auto",
        description=(
            "auto: the fastest here, measured at start (onnxruntime over the converted model, or LiteRT); the"
            " scores are the same"
        ),
    )
    birdnet_model_dir: Path | None = Field(
        None, description="Where the model converted to ONNX is kept (default <data_dir>/models)"
    )
    birdnet_threads: int = Field(1, ge=1, le=64, description="Threads of each interpreter")
    birdnet_interpreters: int = Field(
        0,
        ge=0,
        le=64,
        description=(
            "BirdNET interpreters run at once, each on a core (~20 MB each); 0: one per core, leaving one core to"
            " ingest, Prefect and the rest of each run on a station of 4 cores or more"
        ),
    )

    @property
    def interpreters(self) -> int:
        return self.birdnet_interpreters or default_interpreters(os.cpu_count() or 1)

    birdnet_batch_size: int = Field(4, ge=1, le=64, description="3 s windows per interpreter call")


# the validation context of a command that only reads what the station holds (loading.load_settings)
READING_ONLY = "reading_only"


class SinkSettings(Section):
    """Where detection rows go: Parquet files on the station, InfluxDB 3."""

    parquet_enabled: bool = True
    influx_enabled: bool = False
    influx_host: str = ""
    influx_database: str = "birdflow"
    influx_table: str = "detections"
    influx_token: SecretStr = SecretStr("")

    @model_validator(mode="after")
    def _a_sink_that_works(self, info: ValidationInfo) -> SinkSettings:
        if self.influx_enabled and not self.influx_host:
            raise SettingsError("setting 'influx_host' is required when 'influx_enabled' is true")
        writing = not (info.context or {}).get(READING_ONLY)
        if writing and self.influx_enabled and not self.influx_token.get_secret_value():
            # influxdb3-python refuses to start without one: the executor would exit and restart forever
            raise SettingsError(
                "setting 'influx_token' (env INFLUX_TOKEN) is required when 'influx_enabled' is true "
                "(an InfluxDB 3 started --without-auth accepts any value)"
            )
        if not self.parquet_enabled and not self.influx_enabled:
            raise SettingsError("enable at least one detection sink ('parquet_enabled' or 'influx_enabled')")
        return self


class DetectionSettings(Section):
    """What is done with what was heard: rare species pushed, clips kept, human voices filtered
    (docs/operating.md, "What was heard")."""

    rare_window_days: float = Field(
        30.0,
        gt=0,
        description="A species not heard at this station for this long is rare again (an event, a notification)",
    )
    watch_species: Names = Field(
        default_factory=list,
        description="Species (scientific or common names) that are always rare: every recording with one is pushed",
    )
    rare_confirm_window_s: float = Field(
        3600.0,
        ge=0,
        description=(
            "A rare species heard by two stations (confirm_by) within this many seconds of each other is a "
            "birdflow.detection.confirmed event on the Prefect server the rare events go to; 0: never"
        ),
    )
    confirm_by: Literal["stations", "listeners"] = Field(
        "stations", description="What two sightings must differ in to confirm each other: stations, or listeners"
    )
    run_artifacts: bool = Field(
        True, description="Each run with detections carries a table artifact of them in the Prefect UI"
    )
    hourly_settle_s: float = Field(
        300.0,
        ge=0,
        description="An hour of species counts is written this long after it closes (late recordings still add to it)",
    )
    influx_hourly_table: str = Field("species_hourly", description="Influx table of the hourly species counts")
    clips_enabled: bool = Field(
        True, description="Keep a FLAC clip and a spectrogram PNG of good detections, in the archive under clips/"
    )
    clip_min_confidence: float = Field(0.6, ge=0.01, le=1.0, description="Detections at or above this get a clip")
    clip_padding_s: float = Field(1.0, ge=0, le=10, description="Audio kept before and after the 3 s window of a clip")
    clip_link_days: float = Field(
        30.0,
        gt=0,
        le=365,
        description="A clip's link in a review form opens for this long (an S3 archive's own link: 7 days at most)",
    )
    clips_per_species_per_day: int = Field(
        10,
        ge=1,
        description="Clips kept per species and day, the most confident; a species' best clip ever is never deleted",
    )
    privacy_filter: Annotated[Literal["off", "silence", "drop"], BeforeValidator(yaml_switch)] = Field(
        "off",
        description=(
            "Human voices: silence zeroes their windows in the archive and clips; drop archives no audio of such a "
            "recording"
        ),
    )
    review_rare: bool = Field(
        True,
        description=(
            "Each rare species of a recording opens a review run in the Prefect UI (its spectrogram, a form for the "
            "verdict); `birdflow review list` shows those waiting"
        ),
    )
    review_sample_share: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Of the other detections, this share is also asked to be reviewed (a sample of frequent species)",
    )
    privacy_threshold: float = Field(
        0.3,
        ge=0.01,
        le=0.99,
        description="A window whose human score (BirdNET's human classes) reaches this holds a human",
    )


class ExportSettings(Section):
    """What the exports tell eBird and GBIF beyond the detections: where and when in local terms, who publishes
    them under which licence (docs/operating.md, "Exports")."""

    timezone: str = Field(
        "",
        description=(
            "The station's IANA time zone (America/New_York): eBird's local dates and times; empty: found from "
            "latitude and longitude"
        ),
    )
    country_code: str = Field("", description="ISO 3166-1 country code of the station (US): eBird records, Darwin Core")
    state_code: str = Field(
        "", description="ISO 3166-2 code of its state or province (NY or US-NY): eBird's State/Province column"
    )
    coordinate_uncertainty_m: float = Field(
        100.0, gt=0, description="How far from latitude/longitude a listener may be, in metres (Darwin Core)"
    )
    ebird_min_confidence: float = Field(
        0.75,
        ge=0.01,
        le=1.0,
        description="eBird records take reviewed detections (confirmed or relabelled) and unreviewed ones from this",
    )
    dataset_title: str = Field("", description="Title of the Darwin Core Archive; empty: the station's detections")
    dataset_license: Literal["CC0-1.0", "CC-BY-4.0", "CC-BY-NC-4.0"] = Field(
        "CC-BY-4.0", description="Licence of the records (the three GBIF publishes under)"
    )
    rights_holder: str = Field("", description="Who holds the rights to the records (a person or organisation)")
    contact_name: str = Field("", description="Who answers questions about the dataset (eml.xml contact)")
    contact_email: str = Field("", description="Their e-mail address")

    @field_validator("timezone")
    @classmethod
    def _a_known_time_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        if value:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"{value!r} is no IANA time zone (e.g. America/New_York, Europe/Berlin)") from None
        return value

    @field_validator("country_code")
    @classmethod
    def _two_letters(cls, value: str) -> str:
        value = value.strip().upper()
        if value and not (len(value) == 2 and value.isascii() and value.isalpha()):
            raise ValueError(f"{value!r} is no ISO 3166-1 alpha-2 code (e.g. US, DE)")
        return value

    @field_validator("state_code")
    @classmethod
    def _subdivision(cls, value: str) -> str:
        value = value.strip().upper().rpartition("-")[2]
        if value and not (1 <= len(value) <= 3 and value.isascii() and value.isalnum()):
            raise ValueError(f"{value!r} is no ISO 3166-2 subdivision code (e.g. NY or US-NY)")
        return value

    @field_validator("contact_email")
    @classmethod
    def _an_address(cls, value: str) -> str:
        value = value.strip()
        if value and (value.count("@") != 1 or not all(value.split("@"))):
            raise ValueError(f"{value!r} is no e-mail address")
        return value


class ArchiveSettings(Section):
    """Where recordings are archived, and which folders a backfill may read."""

    backfill_roots: Folders = Field(
        default_factory=list,
        description=(
            "Folders a backfill may read besides the station's recordings, failed and archive folders; "
            "flow runs read no audio elsewhere"
        ),
    )
    archive_backend: Literal["local", "s3"] = "local"
    archive_dir: Path | None = Field(None, description="Local archive root; default <data_dir>/archive")
    s3_bucket: str = ""
    s3_prefix: str = ""
    s3_endpoint_url: str = ""
    s3_region: str = "us-east-1"
    aws_access_key_id: str = ""
    aws_secret_access_key: SecretStr = SecretStr("")
    s3_block_name: str = "birdflow-archive"
    archive_format: Literal["wav", "flac"] = Field(
        "flac",
        description="WAV recordings are archived as lossless FLAC (verified to decode to identical PCM) or as sent",
    )
    keep_local_recordings: bool = Field(
        False, description="With an S3 archive, also keep a local copy in the local archive (subject to its retention)"
    )

    @model_validator(mode="after")
    def _s3_has_a_bucket(self) -> ArchiveSettings:
        if self.archive_backend == "s3" and not self.s3_bucket:
            raise SettingsError("setting 's3_bucket' is required when 'archive_backend' is 's3'")
        return self


class UnattendedSettings(Section):
    """Running unattended: re-drive of failed runs, the disk floor, retention (docs/operating.md)."""

    redrive_delays_s: Seconds = Field(
        default_factory=lambda: [60.0, 120.0, 300.0, 900.0, 3600.0],
        description="Waits before each automatic re-run of a failed recording's run; the last one repeats",
    )
    redrive_max_age_days: float = Field(
        7.0, gt=0, description="A recording whose run still fails this long after it arrived is given up (audio kept)"
    )
    maintenance_interval_s: float = Field(
        600.0,
        ge=10,
        description="How often the executor runs the maintenance deployment (re-drive sweep, retention, compaction)",
    )
    min_free_disk_mb: int = Field(
        500, ge=0, description="Below this free space retention runs at once, then new recordings are refused (507)"
    )
    run_retention_days: float = Field(
        14.0,
        gt=1 / 24,
        description="Flow runs (task runs, logs, artifacts) and cached results older than this are deleted",
    )
    history_budget_mb: float = Field(
        0.0,
        ge=0,
        description="Disk for run history and state (Prefect database, caches, records); past it, or near the "
        "disk floor, the oldest run history goes first. 0: 5 % of the data disk (1.6 GB of a 32 GB card)",
    )
    history_check_interval_s: float = Field(
        300.0,
        ge=1,
        description="How often the embedded Prefect server checks its run history against history_budget_mb",
    )
    local_archive_max_gb: float = Field(0.0, ge=0, description="Cap of the local archive, oldest first; 0: no cap")
    local_archive_max_days: float = Field(0.0, ge=0, description="Age limit of the local archive; 0: no limit")
    local_archive_purge_at_floor: bool = Field(
        False,
        description="At the disk floor, delete local archive audio that is the only copy (recordings without "
        "detections first, then the oldest; never clips) rather than refuse new recordings with 507",
    )

    @field_validator("redrive_delays_s")
    @classmethod
    def _positive_delays(cls, value: list[float]) -> list[float]:
        if not value or any(delay <= 0 for delay in value):
            raise ValueError("give one or more positive delays in seconds, e.g. 60,120,300,900,3600")
        return value


class ObservabilitySettings(Section):
    """Metrics: who may read /metrics, and the Prometheus agent that remote-writes them centrally."""

    metrics_token: SecretStr = Field(
        SecretStr(""),
        description=(
            "Bearer token Prometheus sends for /metrics; empty: /metrics answers loopback only when ingest_auth is on"
        ),
    )
    prometheus_scrape_interval_s: int = Field(15, ge=1, le=3600)
    prometheus_remote_write_url: str = Field("", description="Central Prometheus /api/v1/write; empty: none")
    prometheus_remote_write_user: str = ""
    prometheus_remote_write_password: SecretStr = SecretStr("")


class MqttSettings(Section):
    """Detections, rare species and listener health published to an MQTT broker, with Home Assistant's
    discovery (docs/operating.md, "MQTT"). Off while mqtt_host is empty."""

    mqtt_host: str = Field("", description="Broker host; empty: nothing is published")
    mqtt_port: int = Field(1883, ge=1, le=65535, description="1883, or 8883 with TLS")
    mqtt_username: str = ""
    mqtt_password: SecretStr = SecretStr("")
    mqtt_tls: bool = Field(False, description="TLS to the broker, checked against mqtt_ca_file or the system's CAs")
    mqtt_ca_file: Path | None = Field(None, description="CA certificate of the broker's (empty: the system's)")
    mqtt_topic_prefix: str = Field("birdflow", pattern=r"^[^#+\s]+$", description="Topics: <prefix>/<station>/...")
    mqtt_discovery_prefix: str = Field(
        "homeassistant", pattern=r"^[^#+\s]*$", description="Home Assistant's discovery prefix; empty: no discovery"
    )
    mqtt_outbox_max_messages: int = Field(
        100_000, ge=100, description="Messages kept while the broker is away; past it the oldest go (counted)"
    )

    @model_validator(mode="after")
    def _tls_has_its_port(self):
        if self.mqtt_ca_file is not None and not self.mqtt_tls:
            raise SettingsError("setting 'mqtt_ca_file' is for TLS: set 'mqtt_tls' to true as well")
        return self
