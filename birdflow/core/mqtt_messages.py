"""What a station publishes over MQTT, as messages (topic, JSON payload, retained or not): each detection, each
rare species, each verdict a person gave, each species' latest state and each listener's health, and the Home
Assistant discovery configs that make the station and its species appear there as sensors by themselves. No
network here."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from birdflow.core.outbox import Message


def slug(name: str) -> str:
    """A name as a topic level and an id: lower case, runs of anything else than letters and digits as '_'."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _json(values: dict[str, Any]) -> bytes:
    return json.dumps(values, default=_text, separators=(",", ":")).encode()


def _text(value: Any) -> str:
    return value.isoformat().replace("+00:00", "Z") if isinstance(value, datetime) else str(value)


class Topics:
    """The topics of one station under a prefix, and Home Assistant's discovery topics (none without a prefix)."""

    def __init__(self, prefix: str, station_id: str, discovery_prefix: str = ""):
        self.base = f"{prefix}/{station_id}"
        self.station_id = station_id
        self.discovery_prefix = discovery_prefix

    @property
    def detection(self) -> str:
        return f"{self.base}/detection"

    @property
    def rare(self) -> str:
        return f"{self.base}/rare"

    @property
    def review(self) -> str:
        return f"{self.base}/review"

    @property
    def last_detection(self) -> str:
        return f"{self.base}/last_detection"

    def species(self, scientific_name: str) -> str:
        return f"{self.base}/species/{slug(scientific_name)}"

    def health(self, listener_id: str) -> str:
        return f"{self.base}/listener/{slug(listener_id)}/health"

    def discovery(self, object_id: str) -> str:
        return f"{self.discovery_prefix}/sensor/birdflow_{slug(self.station_id)}_{object_id}/config"

    def device(self) -> dict[str, Any]:
        return {
            "identifiers": [f"birdflow_{slug(self.station_id)}"],
            "name": f"birdflow {self.station_id}",
            "manufacturer": "birdflow",
            "model": "BirdNET station",
        }


def detection_messages(rows: Iterable[dict[str, Any]], rare: set[str], topics: Topics) -> list[Message]:
    """A recording's detections (rows of birdflow.core.detections.SCHEMA): one message each, one per rare
    species, each species' latest state (retained) and, with discovery, the config of its sensor (retained)."""
    rows = list(rows)
    messages = []
    for row in rows:
        messages.append(Message(topics.detection, _json({**_detection(row), "rare": row["scientific_name"] in rare})))
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["scientific_name"] not in best or row["confidence"] > best[row["scientific_name"]]["confidence"]:
            best[row["scientific_name"]] = row
    for scientific, row in sorted(best.items()):
        state = _json({**_detection(row), "rare": scientific in rare})
        if scientific in rare:
            messages.append(Message(topics.rare, state))
        messages.append(Message(topics.species(scientific), state, retain=True))
        if topics.discovery_prefix:
            messages.append(Message(topics.discovery(slug(scientific)), _species_sensor(row, topics), retain=True))
    if rows:
        latest = max(rows, key=lambda row: (row["time"], row["confidence"]))
        messages.append(Message(topics.last_detection, _json(_detection(latest)), retain=True))
        if topics.discovery_prefix:
            messages.append(Message(topics.discovery("last_species"), _last_species_sensor(topics), retain=True))
    return messages


def review_messages(reviews: Iterable[dict[str, Any]], topics: Topics) -> list[Message]:
    """A message per verdict (rows of birdflow.core.reviews.REVIEWS_SCHEMA)."""
    return [Message(topics.review, _json(review)) for review in reviews]


def health_messages(reports: Iterable[dict[str, Any]], topics: Topics) -> list[Message]:
    """Each listener's latest health report (retained), by listener."""
    latest: dict[str, dict[str, Any]] = {}
    for report in reports:
        latest[report["listener_id"]] = report
    return [Message(topics.health(listener), _json(report), retain=True) for listener, report in sorted(latest.items())]


def _detection(row: dict[str, Any]) -> dict[str, Any]:
    keys = ("time", "station_id", "listener_id", "recording_id", "scientific_name", "common_name", "confidence")
    return {key: row[key] for key in keys} | {"start_s": row["start_s"], "end_s": row["end_s"]}


def _species_sensor(row: dict[str, Any], topics: Topics) -> bytes:
    state_topic = topics.species(row["scientific_name"])
    return _json(
        {
            "name": row["common_name"],
            "unique_id": f"birdflow_{slug(topics.station_id)}_{slug(row['scientific_name'])}",
            "state_topic": state_topic,
            "value_template": "{{ value_json.time }}",
            "device_class": "timestamp",
            "json_attributes_topic": state_topic,
            "icon": "mdi:bird",
            "device": topics.device(),
        }
    )


def _last_species_sensor(topics: Topics) -> bytes:
    return _json(
        {
            "name": "Last species heard",
            "unique_id": f"birdflow_{slug(topics.station_id)}_last_species",
            "state_topic": topics.last_detection,
            "value_template": "{{ value_json.common_name }}",
            "json_attributes_topic": topics.last_detection,
            "icon": "mdi:bird",
            "device": topics.device(),
        }
    )
