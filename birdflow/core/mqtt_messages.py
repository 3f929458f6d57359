"""What a station publishes over MQTT, as messages (topic, JSON payload, retained or not): each detection, each
rare species (a Home Assistant event), each verdict a person gave, each species' latest state, the detections of
the day and each listener's health, and the Home Assistant discovery configs that make the station, its species
and its listeners appear there by themselves (docs/operating.md, "MQTT and Home Assistant"). No network here."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import datetime, tzinfo
from typing import Any

from birdflow.core.mqtt_state import MqttState
from birdflow.core.outbox import Message
from birdflow.core.reviews import id_of


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
    def availability(self) -> str:
        """`online` while the station's publisher is connected; `offline` (its last will) once it is not."""
        return f"{self.base}/status"

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

    @property
    def detections_today(self) -> str:
        return f"{self.base}/detections_today"

    @property
    def home_assistant_status(self) -> str:
        """Where Home Assistant says `online` when it starts (its birth message): discovery is sent again."""
        return f"{self.discovery_prefix}/status"

    def species(self, scientific_name: str) -> str:
        return f"{self.base}/species/{slug(scientific_name)}"

    def health(self, listener_id: str) -> str:
        return f"{self.base}/listener/{slug(listener_id)}/health"

    def discovery(self, object_id: str, component: str = "sensor") -> str:
        return f"{self.discovery_prefix}/{component}/birdflow_{slug(self.station_id)}_{object_id}/config"

    def species_discovery(self, scientific_name: str) -> str:
        return self.discovery(slug(scientific_name))

    def device(self) -> dict[str, Any]:
        return {
            "identifiers": [f"birdflow_{slug(self.station_id)}"],
            "name": f"birdflow {self.station_id}",
            "manufacturer": "birdflow",
            "model": "BirdNET station",
        }

    def listener_device(self, listener_id: str) -> dict[str, Any]:
        return {
            "identifiers": [f"birdflow_{slug(self.station_id)}_{slug(listener_id)}"],
            "name": f"listener {listener_id}",
            "manufacturer": "birdflow",
            "model": "listener",
            "via_device": f"birdflow_{slug(self.station_id)}",
        }


def detection_payload(row: dict[str, Any], clip_links: Mapping[str, str]) -> dict[str, Any]:
    """What a message says of a detection: its id, when, who heard it, what and how sure, and the clip's link
    (when the station has a public_url and the detection a clip)."""
    keys = ("time", "station_id", "listener_id", "recording_id", "scientific_name", "common_name", "confidence")
    payload = {"detection_id": id_of(row)} | {key: row[key] for key in keys}
    payload |= {"start_s": row["start_s"], "end_s": row["end_s"]}
    if row.get("clip_key") and row["clip_key"] in clip_links:
        payload["clip_url"] = clip_links[row["clip_key"]]
    return payload


def recording_messages(
    rows: Iterable[dict[str, Any]],
    rare: set[str],
    topics: Topics,
    state: MqttState,
    zone: tzinfo,
    clip_links: Mapping[str, str] | None = None,
) -> list[Message]:
    """A recording's detections (rows of birdflow.core.detections.SCHEMA): one message each; a rare-bird event
    per rare species; each species' state, the last detection and today's count (retained, and only where
    newer than what they show: a recording processed late changes none of them); and, with discovery, the
    configs of entities Home Assistant does not have yet."""
    rows = sorted(rows, key=lambda row: (row["time"], row["start_s"]))
    clip_links = clip_links or {}
    messages = [
        Message(topics.detection, _json({**detection_payload(row, clip_links), "rare": row["scientific_name"] in rare}))
        for row in rows
    ]
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["scientific_name"] not in best or row["confidence"] > best[row["scientific_name"]]["confidence"]:
            best[row["scientific_name"]] = row
    for scientific, row in sorted(best.items()):
        payload = {**detection_payload(row, clip_links), "rare": scientific in rare}
        if scientific in rare:
            messages.append(Message(topics.rare, _json({"event_type": "rare", **payload})))
        if state.newer(topics.species(scientific), row["time"], payload["detection_id"]):
            messages.append(Message(topics.species(scientific), _json(payload), retain=True))
    if rows:
        latest = max(rows, key=lambda row: (row["time"], row["confidence"]))
        payload = detection_payload(latest, clip_links)
        if state.newer(topics.last_detection, latest["time"], payload["detection_id"]):
            messages.append(Message(topics.last_detection, _json(payload), retain=True))
        today = datetime.now(zone).date().isoformat()
        for day, heard in sorted(Counter(row["time"].astimezone(zone).date().isoformat() for row in rows).items()):
            total = state.count(day, heard)
            if day == today:
                messages.append(Message(topics.detections_today, _json({"date": day, "count": total}), retain=True))
    if topics.discovery_prefix:
        configs = station_configs(topics) | {
            topics.species_discovery(row["scientific_name"]): _species_sensor(row, topics) for row in best.values()
        }
        messages += state.configs_to_send(configs)
    return messages


def removed_species_messages(
    scientific_name: str, detection_id: str, topics: Topics, state: MqttState
) -> list[Message]:
    """A verdict said the detection was not the species: when the species' entity shows that detection, the
    entity goes (an empty retained config) with its state."""
    if state.shows(topics.species(scientific_name)) != detection_id:
        return []
    return state.remove(topics.species_discovery(scientific_name), topics.species(scientific_name))


def review_messages(reviews: Iterable[dict[str, Any]], topics: Topics) -> list[Message]:
    """A message per verdict (rows of birdflow.core.reviews.REVIEWS_SCHEMA)."""
    return [Message(topics.review, _json(review)) for review in reviews]


def health_messages(reports: Iterable[dict[str, Any]], topics: Topics, state: MqttState | None = None) -> list[Message]:
    """Each listener's latest health report (retained), by listener; with discovery (and `state`), a device per
    listener with its battery and signal sensors, configured once."""
    latest: dict[str, dict[str, Any]] = {}
    for report in reports:
        latest[report["listener_id"]] = report
    messages = [
        Message(topics.health(listener), _json(report), retain=True) for listener, report in sorted(latest.items())
    ]
    if topics.discovery_prefix and state is not None:
        configs: dict[str, bytes] = {}
        for listener in sorted(latest):
            configs |= listener_configs(listener, topics)
        messages += state.configs_to_send(configs)
    return messages


def _config(topics: Topics, values: dict[str, Any]) -> bytes:
    """A discovery config: the entity is available while the station's publisher is."""
    return _json({**values, "availability_topic": topics.availability, "device": values.get("device", topics.device())})


def station_configs(topics: Topics) -> dict[str, bytes]:
    """The station's own entities: the last species heard, the detections today, the rare-bird event."""
    station = slug(topics.station_id)
    return {
        topics.discovery("last_species"): _config(
            topics,
            {
                "name": "Last species heard",
                "unique_id": f"birdflow_{station}_last_species",
                "state_topic": topics.last_detection,
                "value_template": "{{ value_json.common_name }}",
                "json_attributes_topic": topics.last_detection,
                "icon": "mdi:bird",
            },
        ),
        topics.discovery("detections_today"): _config(
            topics,
            {
                "name": "Detections today",
                "unique_id": f"birdflow_{station}_detections_today",
                "state_topic": topics.detections_today,
                "value_template": "{{ value_json.count }}",
                "state_class": "total_increasing",
                "icon": "mdi:counter",
            },
        ),
        topics.discovery("rare_bird", "event"): _config(
            topics,
            {
                "name": "Rare bird",
                "unique_id": f"birdflow_{station}_rare_bird",
                "state_topic": topics.rare,
                "event_types": ["rare"],
                "icon": "mdi:bird",
            },
        ),
    }


def _species_sensor(row: dict[str, Any], topics: Topics) -> bytes:
    state_topic = topics.species(row["scientific_name"])
    return _config(
        topics,
        {
            "name": row["common_name"],
            "unique_id": f"birdflow_{slug(topics.station_id)}_{slug(row['scientific_name'])}",
            "state_topic": state_topic,
            "value_template": "{{ value_json.time }}",
            "device_class": "timestamp",
            "json_attributes_topic": state_topic,
            "icon": "mdi:bird",
        },
    )


def listener_configs(listener_id: str, topics: Topics) -> dict[str, bytes]:
    """A listener as a device of its own, with its battery voltage and signal strength from its health."""
    listener = slug(listener_id)
    health = topics.health(listener_id)
    return {
        topics.discovery(f"{listener}_{name}"): _config(
            topics,
            {
                "name": label,
                "unique_id": f"birdflow_{slug(topics.station_id)}_{listener}_{name}",
                "state_topic": health,
                "value_template": f"{{{{ value_json.{field} }}}}",
                "device_class": device_class,
                "unit_of_measurement": unit,
                "state_class": "measurement",
                "device": topics.listener_device(listener_id),
            },
        )
        for name, label, field, device_class, unit in (
            ("battery", "Battery", "battery_v", "voltage", "V"),
            ("signal", "Signal", "rssi_dbm", "signal_strength", "dBm"),
        )
    }
