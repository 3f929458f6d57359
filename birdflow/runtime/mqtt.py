"""The MQTT publisher: drains the station's outbox (birdflow.core.outbox) to the broker the settings name,
QoS 1 and in order, a message removed only once the broker acknowledged it. Runs as a thread of the executor and
of `birdflow worker`: one of them publishes (it holds the station's publisher lock), another takes over when that
one stops. While the broker is away or refuses the credentials, messages wait in the outbox and the reason is
logged."""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import logging
import os
import threading
import time
from datetime import datetime, timezone, tzinfo
from zoneinfo import ZoneInfo

from birdflow.core.mqtt_messages import Topics
from birdflow.core.mqtt_state import MqttState
from birdflow.core.outbox import Outbox
from birdflow.runtime import metrics
from birdflow.settings import Settings

log = logging.getLogger("birdflow.mqtt")
BATCH = 100  # messages in flight at once (paho's own window is raised to match)
ACK_TIMEOUT_S = 10.0
IDLE_POLL_S = 0.5
LOCK_RETRY_S = 5.0  # a process waiting to publish tries the lock this often
CA_FILE_RETRY_S = 60.0  # a CA file that cannot be read is looked at again this often
PR_SET_NAME = 15


def name_this_thread(name: str) -> None:
    """The calling thread's name as the system shows it (/proc/<pid>/task/<tid>/comm, top -H), on Linux."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def outbox_of(settings: Settings) -> Outbox | None:
    """The station's MQTT outbox, or None while mqtt_host is empty (nothing is published)."""
    if not settings.mqtt.mqtt_host:
        return None
    return Outbox(settings.mqtt_outbox_file, settings.mqtt.mqtt_outbox_max_messages)


def topics_of(settings: Settings) -> Topics:
    options = settings.mqtt
    return Topics(options.mqtt_topic_prefix, settings.station_id, options.mqtt_discovery_prefix)


def station_zone(settings: Settings) -> tzinfo:
    """Where "today" is counted: the station's timezone setting, else this machine's own time zone."""
    if settings.exports.timezone:
        return ZoneInfo(settings.exports.timezone)
    return datetime.now().astimezone().tzinfo or timezone.utc


class Publisher:
    def __init__(self, settings: Settings):
        import paho.mqtt.client as mqtt

        options = settings.mqtt
        self.settings = settings
        self.outbox = Outbox(settings.mqtt_outbox_file, options.mqtt_outbox_max_messages)
        self.state = MqttState(settings.mqtt_state_file)
        self.topics = topics_of(settings)
        self.connected = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"birdflow-{settings.station_id}", clean_session=True
        )
        self.client.max_inflight_messages_set(BATCH)
        if options.mqtt_username:
            self.client.username_pw_set(options.mqtt_username, options.mqtt_password.get_secret_value() or None)
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        # the broker says `offline` for the station when its connection drops without a goodbye
        self.client.will_set(self.topics.availability, "offline", qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self._refused = ""
        self._unreachable = False  # said once per outage
        self._stopping = False  # a disconnect then is this side's own

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        if reason.is_failure:
            if str(reason) != self._refused:
                log.error("MQTT broker %s refused the connection: %s", self.settings.mqtt.mqtt_host, reason)
            self._refused = str(reason)
            return
        self._refused = ""
        self._unreachable = False
        log.info("MQTT: connected to %s:%d", self.settings.mqtt.mqtt_host, self.settings.mqtt.mqtt_port)
        client.publish(self.topics.availability, "online", qos=1, retain=True)
        if self.topics.discovery_prefix:
            # a broker that lost its retained messages (restarted without persistence) has the configs again
            self.outbox.put(self.state.every_config())
            client.subscribe(self.topics.home_assistant_status, qos=1)
        self.connected.set()

    def _on_message(self, client, userdata, message) -> None:
        """Home Assistant's birth message: it (re)started and asks for discovery again."""
        if message.topic == self.topics.home_assistant_status and message.payload == b"online":
            log.info("MQTT: Home Assistant is online; discovery sent again")
            self.outbox.put(self.state.every_config())

    def _on_connect_fail(self, client, userdata) -> None:
        if not self._unreachable:
            options = self.settings.mqtt
            tls = " or the TLS handshake failed (settings 'mqtt_tls', 'mqtt_ca_file')" if options.mqtt_tls else ""
            log.error(
                "MQTT: cannot connect to %s:%d: the broker is away%s; messages wait, tried again",
                options.mqtt_host,
                options.mqtt_port,
                tls,
            )
        self._unreachable = True

    def _use_tls(self, stop: threading.Event) -> bool:
        """TLS as the settings ask, once its CA file can be read; until then messages wait (False when stopped
        first). A wrong path is said once, with the setting's name, and looked at again every minute."""
        options = self.settings.mqtt
        said = False
        while not stop.is_set():
            try:
                self.client.tls_set(ca_certs=str(options.mqtt_ca_file) if options.mqtt_ca_file else None)
                return True
            except (OSError, ValueError) as exc:
                if not said:
                    log.error(
                        "MQTT: setting 'mqtt_ca_file' (%s) cannot be used: %s; messages wait until it can",
                        options.mqtt_ca_file,
                        exc,
                    )
                    said = True
            stop.wait(CA_FILE_RETRY_S)
        return False

    def _on_disconnect(self, client, userdata, flags, reason, properties) -> None:
        if self.connected.is_set() and not self._stopping:
            log.warning("MQTT: disconnected from %s (%s); messages wait", self.settings.mqtt.mqtt_host, reason)
        self.connected.clear()

    def run(self, stop: threading.Event) -> None:
        """Until `stop` is set: once this process is the station's publisher, connect (and reconnect), then send
        what the outbox holds, oldest first. Its threads are named for the system ("mqtt", "mqtt-network"), so
        that their CPU can be told apart."""
        name_this_thread("mqtt")
        lock = self._publisher_lock(stop)
        if lock is None:
            return
        try:
            self._publish(stop)
        finally:
            os.close(lock)

    def _publisher_lock(self, stop: threading.Event) -> int | None:
        """The station's publisher lock, once this process gets it (None if stopped first): two publishers would
        share one client id, which the broker allows one connection at a time."""
        path = self.settings.mqtt_publisher_lock_file
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return descriptor
            except BlockingIOError:
                if stop.wait(LOCK_RETRY_S):
                    os.close(descriptor)
                    return None

    def _publish(self, stop: threading.Event) -> None:
        options = self.settings.mqtt
        if options.mqtt_tls and not self._use_tls(stop):
            return
        self.client.connect_async(options.mqtt_host, options.mqtt_port, keepalive=30)
        network = threading.Thread(target=self._network, name="mqtt-network", daemon=True)
        network.start()
        try:
            waiting = metrics.MQTT_WAITING.labels(self.settings.station_id)
            while not stop.is_set():
                waiting.set(len(self.outbox))
                if not self.connected.wait(IDLE_POLL_S):
                    continue
                if not self.send_batch():
                    stop.wait(IDLE_POLL_S)
        finally:
            self._stopping = True
            if self.connected.is_set():  # a goodbye: the broker sends no last will for a clean disconnect
                said = self.client.publish(self.topics.availability, "offline", qos=1, retain=True)
                try:
                    said.wait_for_publish(timeout=ACK_TIMEOUT_S)
                except (RuntimeError, ValueError):
                    pass
            self.client.disconnect()
            network.join(timeout=10)

    def _network(self) -> None:
        name_this_thread("mqtt-network")
        self.client.loop_forever(retry_first_connection=True)

    def send_batch(self) -> int:
        """The oldest messages, published; returns how many the broker acknowledged (they leave the outbox)."""
        queued = self.outbox.head(BATCH)
        if not queued:
            return 0
        started = time.perf_counter()
        sent = [
            (item.id, self.client.publish(item.message.topic, item.message.payload, qos=1, retain=item.message.retain))
            for item in queued
        ]
        acknowledged = []
        deadline = time.monotonic() + ACK_TIMEOUT_S
        for id, info in sent:
            try:
                info.wait_for_publish(timeout=max(0.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError):  # not connected any more, or the queue is gone
                break
            if not info.is_published():
                break
            acknowledged.append(id)
        self.outbox.remove(acknowledged)
        metrics.MQTT_PUBLISHED.labels(self.settings.station_id).inc(len(acknowledged))
        metrics.MQTT_SECONDS.labels(self.settings.station_id).inc(time.perf_counter() - started)
        return len(acknowledged)
