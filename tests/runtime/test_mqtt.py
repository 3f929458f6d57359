"""MQTT publishing against a real Mosquitto: what a station publishes arrives in order with Home Assistant's
discovery; a broker restart in the middle loses nothing; credentials and TLS work, and wrong ones keep the
messages waiting. The outbox on its own: once per recording, bounded."""

from __future__ import annotations

import json
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from birdflow.core.mqtt_messages import Topics, detection_messages
from birdflow.core.outbox import Message, Outbox
from birdflow.core.reviews import Verdict, id_of
from birdflow.flows.review import take_verdict
from birdflow.flows.run_resources import RunResources
from birdflow.runtime.mqtt import Publisher
from birdflow.settings import Settings
from birdflow_tools.testbed import LOOPBACK, Mosquitto, wait_until
from tests.builders import HAWK, two_listeners_detections

pytestmark = pytest.mark.skipif(not Mosquitto.available(), reason="needs mosquitto (Debian package mosquitto)")


class Subscriber:
    """A QoS 1 subscriber with a persistent session: what the broker queued for it while it was away arrives."""

    def __init__(self, broker: Mosquitto, topics=("birdflow/#", "homeassistant/#"), **credentials):
        self.received: list[tuple[str, bytes, bool]] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-subscriber", clean_session=False)
        if credentials:
            self.client.username_pw_set(credentials["username"], credentials["password"])
        if broker.tls:
            self.client.tls_set(ca_certs=str(broker.ca_file))
        self.client.on_connect = self._subscribe
        self.client.on_message = self._received
        self.topics_wanted = topics
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.connect(LOOPBACK, broker.port)
        self.client.loop_start()
        wait_until(lambda: self.client.is_connected(), 10, "the subscriber's connection")
        time.sleep(0.3)  # its subscription acknowledged

    def _subscribe(self, client, userdata, flags, reason, properties) -> None:
        for topic in self.topics_wanted:
            client.subscribe(topic, qos=1)

    def _received(self, client, userdata, message) -> None:
        self.received.append((message.topic, bytes(message.payload), bool(message.retain)))

    def topics(self, prefix: str) -> list[str]:
        return [topic for topic, _, _ in self.received if topic.startswith(prefix)]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def settings_for(tmp_path, broker: Mosquitto, **values) -> Settings:
    return Settings.model_validate(
        {
            "station_id": "mqtt01",
            "data_dir": tmp_path / "data",
            "mqtt_host": LOOPBACK,
            "mqtt_port": broker.port,
            **values,
        }
    )


def publishing(settings: Settings) -> tuple[Publisher, threading.Event]:
    publisher, stop = Publisher(settings), threading.Event()
    threading.Thread(target=publisher.run, args=(stop,), daemon=True).start()
    return publisher, stop


def numbered(count: int, first: int = 0) -> list[Message]:
    return [Message("birdflow/mqtt01/detection", json.dumps({"n": n}).encode()) for n in range(first, first + count)]


def test_a_recordings_detections_arrive_in_order_with_home_assistant_discovery(tmp_path):
    broker = Mosquitto(tmp_path / "broker").start()
    subscriber = Subscriber(broker)
    settings = settings_for(tmp_path, broker)
    publisher, stop = publishing(settings)
    try:
        rows = two_listeners_detections().to_pylist()
        messages = detection_messages(rows, {HAWK[0]}, Topics("birdflow", "mqtt01", "homeassistant"))
        publisher.outbox.put(messages)
        wait_until(lambda: len(subscriber.received) >= len(messages), 30, "every message at the subscriber")
        detections = [json.loads(payload) for topic, payload, _ in subscriber.received if topic.endswith("/detection")]
        assert [(d["recording_id"], d["start_s"]) for d in detections] == [
            (row["recording_id"], row["start_s"]) for row in rows
        ]
        assert [d["rare"] for d in detections] == [row["scientific_name"] == HAWK[0] for row in rows]
        [rare] = [json.loads(payload) for topic, payload, _ in subscriber.received if topic == "birdflow/mqtt01/rare"]
        assert rare["common_name"] == "Cooper's Hawk" and rare["confidence"] == 0.77  # the species' best
        config = {topic: json.loads(payload) for topic, payload, _ in subscriber.received if topic.endswith("/config")}
        robin = config["homeassistant/sensor/birdflow_mqtt01_turdus_migratorius/config"]
        assert (
            robin["name"] == "American Robin" and robin["state_topic"] == "birdflow/mqtt01/species/turdus_migratorius"
        )
        assert (
            robin["device"]["identifiers"] == ["birdflow_mqtt01"]
            and robin["unique_id"] == "birdflow_mqtt01_turdus_migratorius"
        )
        assert "homeassistant/sensor/birdflow_mqtt01_last_species/config" in config
        # a person's verdict, stored as any verdict is, is published too
        take_verdict(RunResources(settings), rows[0], Verdict("relabelled", "ada", "cli", *HAWK))
        wait_until(lambda: subscriber.topics("birdflow/mqtt01/review"), 30, "the verdict at the subscriber")
        [review] = [json.loads(payload) for topic, payload, _ in subscriber.received if topic.endswith("/review")]
        assert (review["detection_id"], review["verdict"], review["reviewed_common_name"]) == (
            id_of(rows[0]),
            "relabelled",
            HAWK[1],
        )
        wait_until(lambda: len(publisher.outbox) == 0, 10, "an empty outbox")
    finally:
        stop.set()
        subscriber.close()
        broker.stop()
    # retained: a subscriber that comes later (Home Assistant after a restart) still finds the sensors
    broker.start()
    try:
        late = Subscriber(broker, topics=("homeassistant/#",))
        late.client.unsubscribe("homeassistant/#")
        late.client.subscribe("homeassistant/#", qos=1)
        wait_until(lambda: len(late.topics("homeassistant/")) >= 3, 10, "the retained discovery configs")
        assert all(retained for _, _, retained in late.received)
        late.close()
    finally:
        broker.stop()


def test_a_broker_restart_in_the_middle_loses_nothing_and_keeps_the_order(tmp_path):
    broker = Mosquitto(tmp_path / "broker").start()
    subscriber = Subscriber(broker)
    publisher, stop = publishing(settings_for(tmp_path, broker))
    try:
        publisher.outbox.put(numbered(20))
        wait_until(lambda: len(subscriber.received) >= 20, 30, "the first 20")
        broker.stop()
        publisher.outbox.put(numbered(50, first=20))  # made while the broker is away
        time.sleep(2)
        assert len(publisher.outbox) == 50  # waiting, none lost
        broker.start()
        wait_until(lambda: len({json.loads(p)["n"] for _, p, _ in subscriber.received}) >= 70, 60, "all 70")
        first_seen = list(dict.fromkeys(json.loads(payload)["n"] for _, payload, _ in subscriber.received))
        assert first_seen == list(range(70))  # every one, in order (QoS 1 may repeat one, never skip)
        wait_until(lambda: len(publisher.outbox) == 0, 10, "an empty outbox")
    finally:
        stop.set()
        subscriber.close()
        broker.stop()


def test_credentials_and_tls_work_and_wrong_ones_keep_the_messages_waiting(tmp_path, caplog):
    broker = Mosquitto(tmp_path / "broker", users={"station": "s3cret", "reader": "r3ad"}, tls=True).start()
    subscriber = Subscriber(broker, username="reader", password="r3ad")
    wrong = settings_for(
        tmp_path, broker, mqtt_username="station", mqtt_password="guess", mqtt_tls=True, mqtt_ca_file=broker.ca_file
    )
    publisher, stop = publishing(wrong)
    try:
        publisher.outbox.put(numbered(5))
        wait_until(lambda: "refused the connection" in caplog.text, 20, "the refusal in the log")
        assert len(publisher.outbox) == 5 and subscriber.received == []
        stop.set()
        right = settings_for(
            tmp_path,
            broker,
            mqtt_username="station",
            mqtt_password="s3cret",
            mqtt_tls=True,
            mqtt_ca_file=broker.ca_file,
        )
        publisher, stop = publishing(right)
        wait_until(lambda: len(subscriber.received) >= 5, 30, "the 5 over TLS")
        assert [json.loads(payload)["n"] for _, payload, _ in subscriber.received] == list(range(5))
    finally:
        stop.set()
        subscriber.close()
        broker.stop()


def test_the_outbox_queues_a_recording_once_and_stays_within_its_bound(tmp_path):
    outbox = Outbox(tmp_path / "outbox.sqlite", max_messages=100)
    outbox.put(numbered(3), once_for="mic1_20250601T053000Z_abababab:a1")
    outbox.put(numbered(3), once_for="mic1_20250601T053000Z_abababab:a1")  # a retry, a rerun
    assert len(outbox) == 3
    assert outbox.put(numbered(150, first=3)) == 53  # the oldest go
    queued = outbox.head(200)
    assert len(queued) == 100 and json.loads(queued[0].message.payload)["n"] == 53
    outbox.remove(item.id for item in queued[:10])
    assert len(outbox) == 90 and json.loads(outbox.head(1)[0].message.payload)["n"] == 63
