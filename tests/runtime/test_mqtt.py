"""MQTT publishing against a real Mosquitto: what a station publishes arrives in order with Home Assistant's
discovery; a broker restart in the middle loses nothing; credentials and TLS work, and wrong ones keep the
messages waiting. The outbox on its own: once per recording, bounded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta, timezone

import paho.mqtt.client as mqtt
import pytest

from birdflow.core.birdnet import Detection
from birdflow.core.detections import detections_table
from birdflow.core.mqtt_messages import Topics, recording_messages
from birdflow.core.mqtt_state import MqttState
from birdflow.core.outbox import Message, Outbox
from birdflow.core.reviews import Verdict, id_of
from birdflow.flows.review import take_verdict
from birdflow.flows.run_resources import RunResources
from birdflow.runtime.mqtt import Publisher, topics_of
from birdflow.settings import Settings
from birdflow_tools.testbed import LOOPBACK, Mosquitto, wait_until
from tests.builders import HAWK, JUNE_MORNING, ROBIN, recording_info, two_listeners_detections

pytestmark = pytest.mark.skipif(not Mosquitto.available(), reason="needs mosquitto (Debian package mosquitto)")


class Subscriber:
    """A QoS 1 subscriber with a persistent session: what the broker queued for it while it was away arrives."""

    def __init__(
        self, broker: Mosquitto, topics=("birdflow/#", "homeassistant/#"), client_id="test-subscriber", **credentials
    ):
        self.received: list[tuple[str, bytes, bool]] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
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

    def payloads(self, suffix: str) -> list[dict]:
        """The JSON payloads of the topics that end with `suffix`, in the order they came."""
        return [json.loads(payload) for topic, payload, _ in list(self.received) if topic.endswith(suffix)]

    def last(self, topic: str) -> bytes | None:
        found = [payload for seen, payload, _ in list(self.received) if seen == topic]
        return found[-1] if found else None

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
        topics = Topics("birdflow", "mqtt01", "homeassistant")
        messages = recording_messages(rows, {HAWK[0]}, topics, MqttState(settings.mqtt_state_file), timezone.utc)
        publisher.outbox.put(messages)
        wait_until(lambda: len(subscriber.received) >= len(messages) + 1, 30, "every message at the subscriber")
        detections = [json.loads(payload) for topic, payload, _ in subscriber.received if topic.endswith("/detection")]
        in_time = sorted(rows, key=lambda row: row["time"])  # in the order they were heard
        assert [(d["recording_id"], d["start_s"]) for d in detections] == [
            (row["recording_id"], row["start_s"]) for row in in_time
        ]
        assert [d["rare"] for d in detections] == [row["scientific_name"] == HAWK[0] for row in in_time]
        assert [d["detection_id"] for d in detections] == [id_of(row) for row in in_time]
        [rare] = [json.loads(payload) for topic, payload, _ in subscriber.received if topic == "birdflow/mqtt01/rare"]
        assert rare["common_name"] == "Cooper's Hawk" and rare["confidence"] == 0.77  # the species' best
        assert rare["event_type"] == "rare" and rare["detection_id"] == id_of(rows[3])
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
        # a new client: the first one's session may hold messages queued after it left (they come unretained)
        late = Subscriber(broker, topics=("homeassistant/#",), client_id="late-subscriber")
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
        wait_until(lambda: len(subscriber.payloads("/detection")) >= 20, 30, "the first 20")
        broker.stop()
        publisher.outbox.put(numbered(50, first=20))  # made while the broker is away
        time.sleep(2)
        assert len(publisher.outbox) == 50  # waiting, none lost
        broker.start()
        wait_until(lambda: len({p["n"] for p in subscriber.payloads("/detection")}) >= 70, 60, "all 70")
        first_seen = list(dict.fromkeys(payload["n"] for payload in subscriber.payloads("/detection")))
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
        assert len(publisher.outbox) == 5 and subscriber.payloads("/detection") == []
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
        wait_until(lambda: len(subscriber.payloads("/detection")) >= 5, 30, "the 5 over TLS")
        assert [payload["n"] for payload in subscriber.payloads("/detection")] == list(range(5))
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


PUBLISHING_STATION = (
    "import json, sys, threading\n"
    "from birdflow.runtime.mqtt import Publisher\n"
    "from birdflow.settings import Settings\n"
    "Publisher(Settings.model_validate(json.loads(sys.argv[1]))).run(threading.Event())\n"
)


def robin_heard(hours_after: float, content: str) -> list[dict]:
    start = JUNE_MORNING + timedelta(hours=hours_after)
    recording = recording_info("mic1", start_time=start, content_hash=content * 32)
    return detections_table(recording, [Detection(0.0, 3.0, *ROBIN, 0.8)], "BirdNET_GLOBAL_6K_V2.4", "a1").to_pylist()


def test_home_assistant_sees_the_station_come_and_go_and_gets_each_config_once_and_again_when_it_needs_it(tmp_path):
    broker = Mosquitto(tmp_path / "broker", persistent=False).start()
    subscriber = Subscriber(broker)
    values = {
        "station_id": "mqtt01",
        "data_dir": str(tmp_path / "data"),
        "mqtt_host": LOOPBACK,
        "mqtt_port": broker.port,
    }
    settings = Settings.model_validate(values)
    topics, state, outbox = topics_of(settings), MqttState(settings.mqtt_state_file), Outbox(settings.mqtt_outbox_file)
    robin_config, last_config = topics.species_discovery(ROBIN[0]), topics.discovery("last_species")
    # the station's publisher in a process of its own, to be killed as a power cut would
    station = subprocess.Popen([sys.executable, "-c", PUBLISHING_STATION, json.dumps(values)])
    try:
        wait_until(lambda: subscriber.last(topics.availability) == b"online", 30, "the station online")
        heard = [robin_heard(hour, content) for hour, content in ((0, "a1"), (1, "a2"), (2, "a3"))]
        for rows in heard:
            outbox.put(recording_messages(rows, set(), topics, state, timezone.utc))
        wait_until(lambda: len(outbox) == 0 and len(subscriber.payloads("/detection")) == 3, 30, "3 recordings")
        # each entity configured once, however many recordings name it
        assert len(subscriber.topics(robin_config)) == len(subscriber.topics(last_config)) == 1
        configs = {topic: json.loads(payload) for topic, payload, _ in subscriber.received if topic.endswith("/config")}
        assert {config["availability_topic"] for config in configs.values()} == {topics.availability}
        # a recording processed late (an hour before the others) does not move the last detection back
        outbox.put(recording_messages(robin_heard(-1, "a0"), set(), topics, state, timezone.utc))
        wait_until(lambda: len(subscriber.payloads("/detection")) == 4, 30, "the late recording")
        shown = json.loads(subscriber.last(topics.last_detection))
        assert shown["detection_id"] == id_of(heard[-1][0]) and shown["recording_id"] == heard[-1][0]["recording_id"]
        # Home Assistant restarts and says so (its birth message): every config again
        subscriber.client.publish(topics.home_assistant_status, "online", qos=1)
        wait_until(lambda: len(subscriber.topics(robin_config)) == 2, 30, "discovery after HA's birth message")
        assert len(subscriber.topics(last_config)) == 2
        # the detection the robin's entity shows is rejected: the entity goes (an empty retained config)
        take_verdict(RunResources(settings), heard[-1][0], Verdict("rejected", "ada", "cli"))
        wait_until(lambda: subscriber.last(robin_config) == b"", 30, "the robin's entity removed")
        # the broker restarts without persistence (its retained configs lost): the station sends them again
        sent_before = len(subscriber.topics(last_config))
        broker.stop()
        broker.start()
        wait_until(lambda: len(subscriber.topics(last_config)) > sent_before, 60, "discovery after the restart")
        assert subscriber.last(robin_config) == b""  # a removed entity stays removed
        # the station dies without a goodbye: the broker's last will says offline
        station.send_signal(signal.SIGKILL)
        station.wait(timeout=10)
        wait_until(lambda: subscriber.last(topics.availability) == b"offline", 60, "the last will")
    finally:
        if station.poll() is None:
            os.kill(station.pid, signal.SIGKILL)
        subscriber.close()
        broker.stop()


def test_a_ca_file_that_cannot_be_read_or_a_failing_handshake_is_said_once_and_messages_wait(tmp_path, caplog):
    broker = Mosquitto(tmp_path / "broker").start()  # no TLS: a handshake with it fails
    missing = settings_for(tmp_path / "a", broker, mqtt_tls=True, mqtt_ca_file=tmp_path / "no-such-ca.crt")
    publisher, stop = publishing(missing)
    try:
        publisher.outbox.put(numbered(3))
        wait_until(lambda: "setting 'mqtt_ca_file'" in caplog.text, 10, "the CA file named in the log")
        assert len(publisher.outbox) == 3  # waiting, the publishing thread alive (no executor exits over it)
        stop.set()
        handshake = settings_for(tmp_path / "b", broker, mqtt_tls=True)
        publisher, stop = publishing(handshake)
        publisher.outbox.put(numbered(3))
        wait_until(lambda: "TLS handshake failed" in caplog.text, 20, "the failed handshake in the log")
        time.sleep(4)  # more attempts (the reconnect delay starts at 1 s)
        assert caplog.text.count("cannot connect to") == 1 and len(publisher.outbox) == 3
    finally:
        stop.set()
        broker.stop()
