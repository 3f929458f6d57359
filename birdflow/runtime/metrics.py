"""Prometheus metrics shared by every birdflow process.

`birdflow up` points PROMETHEUS_MULTIPROC_DIR at one folder for all its processes, so the ingest API's
/metrics shows the executor's counters too.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

RECORDINGS_RECEIVED = Counter(
    "birdflow_recordings_received", "Recordings closed and handed to processing", ["station", "source"]
)
RECORDINGS_DISCARDED = Counter(
    "birdflow_recordings_discarded", "Recordings dropped before processing", ["station", "reason"]
)
FRAMES_DROPPED = Counter(
    "birdflow_frames_dropped", "Stream frames dropped (no open recording, repeated, late)", ["station"]
)
GAPS = Counter("birdflow_gaps", "Gaps in streams padded with silence", ["station"])
METADATA_FRAMES = Counter("birdflow_metadata_frames", "Metadata frames skipped", ["station"])
REQUESTS_REJECTED = Counter("birdflow_requests_rejected", "Ingest requests refused with a 4xx", ["station", "reason"])
CONNECTIONS_TIMED_OUT = Counter(
    "birdflow_connections_timed_out", "Ingest connections closed for being too slow, by stage", ["station", "stage"]
)
SOURCES_REFUSED = Counter(
    "birdflow_sources_refused", "Flow runs refused because their audio lies outside the allowed folders", ["station"]
)
OPEN_STREAMS = Gauge(
    "birdflow_open_streams", "Listener streams connected now", ["station"], multiprocess_mode="livesum"
)
FLOW_RUNS_TRIGGERED = Counter("birdflow_flow_runs_triggered", "Flow runs created for recordings", ["station"])
FLOW_RUNS_FINISHED = Counter("birdflow_flow_runs_finished", "Flow runs executed, by final state", ["station", "state"])
BACKLOG = Gauge(
    "birdflow_backlog_recordings", "Recordings waiting for their flow run", ["station"], multiprocess_mode="livemax"
)
REDRIVE_WAITING = Gauge(
    "birdflow_redrive_waiting_recordings",
    "Recordings whose run failed and waits for its automatic re-drive",
    ["station"],
    multiprocess_mode="livemax",
)
RECORDINGS_GIVEN_UP = Counter(
    "birdflow_recordings_given_up",
    "Recordings not processed (audio kept in the failed folder), by reason",
    ["station", "reason"],
)
ANALYSIS_SECONDS = Histogram(
    "birdflow_analysis_seconds",
    "BirdNET inference time per recording",
    ["station"],
    buckets=(0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8),
)
DETECTIONS_WRITTEN = Counter("birdflow_detections_written", "Detection rows written, by sink", ["station", "sink"])
CLIP_SECONDS = Histogram(
    "birdflow_clip_seconds",
    "Time to cut, encode and store a recording's clips and spectrograms (compare with analysis)",
    ["station"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
PRIVACY_FILTERED = Counter(
    "birdflow_privacy_filtered_recordings",
    "Recordings in which a human was heard: audio silenced or not kept (privacy_filter)",
    ["station", "action"],
)
MQTT_PUBLISHED = Counter("birdflow_mqtt_published", "MQTT messages the broker acknowledged", ["station"])
MQTT_SECONDS = Counter("birdflow_mqtt_publish_seconds", "Time spent publishing to MQTT (wall)", ["station"])
MQTT_WAITING = Gauge(
    "birdflow_mqtt_waiting_messages",
    "MQTT messages waiting in the outbox for the broker",
    ["station"],
    multiprocess_mode="livemax",
)
HEALTH_REPORTS = Counter("birdflow_listener_health_reports", "Listener health datagrams taken", ["station"])
HEALTH_REFUSED = Counter(
    "birdflow_listener_health_refused",
    "Listener health datagrams dropped, by reason (their content is never logged)",
    ["station", "reason"],
)
# per listener, at most health_max_listeners of them; "max" keeps the last value after the ingest restarts, so a
# listener that went quiet shows as stale instead of vanishing
LISTENER_LAST_HEALTH = Gauge(
    "birdflow_listener_health_last_seen_timestamp_seconds",
    "When the listener last sent its health (Unix time)",
    ["station", "listener"],
    multiprocess_mode="max",
)
LISTENER_HEALTH = {
    name: Gauge(f"birdflow_listener_{name}", help_text, ["station", "listener"], multiprocess_mode="max")
    for name, help_text in {
        "battery_v": "Battery voltage the listener reported",
        "rssi_dbm": "Wi-Fi signal strength the listener reported",
        "temperature_c": "Temperature the listener reported",
        "free_storage_mb": "Free storage the listener reported",
        "uptime_s": "Uptime the listener reported",
    }.items()
}
RARE_SIGHTINGS = Counter(
    "birdflow_rare_sightings",
    "Species heard for the first time within rare_window_days (or watched), announced as events",
    ["station"],
)
DETECTIONS_BY_SPECIES = Counter(
    "birdflow_species_detections",
    "Detections by species (the first species seen by name, later ones as 'other')",
    ["station", "species"],
)
SINK_WRITE_FAILURES = Counter(
    "birdflow_sink_write_failures", "Failed detection writes (retried), by sink", ["station", "sink"]
)
ARCHIVE_PURGED = Counter(
    "birdflow_archive_purged",
    "Archived recordings deleted, by reason (age, size, floor, floor-copy)",
    ["station", "reason"],
)
ARCHIVE_BYTES = Counter(
    "birdflow_archive_bytes", "Audio bytes uploaded to the archive (duplicates skipped)", ["station", "backend"]
)
DISK_FREE = Gauge(
    "birdflow_disk_free_bytes", "Free space on the disk of the data directory", ["station"], multiprocess_mode="livemax"
)
STATE_FILES_DAMAGED = Gauge(
    "birdflow_state_files_damaged",
    "State files found damaged and rebuilt whose damaged copy is still kept in data/state",
    ["station"],
    multiprocess_mode="livemax",
)
SPECIES_LABELS_MAX = 200
_species_seen: set[str] = set()


def count_purged(station_id: str, purged: list) -> list:
    """Archived recordings deleted (birdflow.core.retention.Purged), counted by reason; returns them."""
    for item in purged:
        ARCHIVE_PURGED.labels(station_id, item.reason).inc()
    return purged


def species_label(scientific_name: str) -> str:
    """A bounded label set: the first SPECIES_LABELS_MAX species by name, then 'other'."""
    if scientific_name in _species_seen or len(_species_seen) < SPECIES_LABELS_MAX:
        _species_seen.add(scientific_name)
        return scientific_name
    return "other"


def exposition() -> tuple[bytes, str]:
    """The text exposition of this process, or of all birdflow processes in multiprocess mode."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
