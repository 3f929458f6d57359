"""The station's image as people install it, built from docker/Dockerfile and run under podman: a station set up
as docs/fleet.md shows (`init` on the volume, then `up`: listener tokens and the UI's login on), healthy, an upload
analysed, the run in the Prefect UI, a non-root user, a data volume that keeps everything across `stop` and `start`
with a stream in progress, the review story with `docker exec`-style commands, and every birdflow command through
the entrypoint. Skipped where podman cannot run containers (not installed, not root)."""

from __future__ import annotations

import os
import platform
import re
import socket
import threading
import time

import httpx
import pytest

from birdflow_tools.image import (
    ARCHES,
    Container,
    Podman,
    build,
    build_and_try,
    detection_rows,
    emulation_problem,
    make_base,
    podman_problem,
)
from birdflow_tools.testbed import LOOPBACK, free_port, wait_until
from tests.app.test_packaging import birdflow_commands
from tests.browser import Page
from tests.conftest import require_sample
from tests.ingest_client import frames_of
from tests.review_story import SOUNDSCAPE, Shape, Subscriber, log_in, run_review_story

pytestmark = pytest.mark.e2e
IMAGE = "birdflow:test"
STOP_GRACE_S = 30  # what the compose files give the container (stop_grace_period)


@pytest.fixture(scope="module")
def podman(tmp_path_factory) -> Podman:
    """The image, built as the Dockerfile says on a stand-in of its base (made once per machine)."""
    problem = podman_problem()
    if problem:
        pytest.skip(problem)
    arch = next(name for name, machine in ARCHES.items() if machine == platform.machine())
    podman = Podman(tmp_path_factory.mktemp("podman"))
    make_base(podman, arch)
    build(podman, IMAGE, arch)
    return podman


@pytest.fixture(scope="module")
def station(podman, tmp_path_factory, mosquitto):
    """`init` on a host folder as the volume, then `up` in the image on what it wrote (with an MQTT broker set);
    healthy before the tests use it."""
    ports = {"INGEST_PORT": free_port(), "PREFECT_PORT": free_port(), "HEALTH_PORT": free_port()}
    container = Container(
        podman,
        IMAGE,
        f"birdflow-test-{os.getpid()}",
        tmp_path_factory.mktemp("volume"),
        {name: str(port) for name, port in ports.items()},
    )
    container.data.mkdir(exist_ok=True)
    os.chown(container.data, 1000, 1000)
    initialised = container.once("init", "--station", "pi-box")
    assert initialised.returncode == 0, initialised.stderr
    settings = container.data / "settings.yaml"
    settings.write_text(
        re.sub(
            r"^mqtt_port: .*$",
            f"mqtt_port: {mosquitto.port}",
            re.sub(r"^mqtt_host: .*$", f"mqtt_host: {LOOPBACK}", settings.read_text(), flags=re.MULTILINE),
            flags=re.MULTILINE,
        )
    )
    container.run()
    try:
        wait_healthy(container)
        yield container
    finally:
        container.remove()


def wait_healthy(container: Container) -> None:
    try:
        wait_until(container.healthy, 180, "a healthy container", interval_s=2)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; its log ends:\n{container.logs()[-3000:]}") from None


def port(container: Container, name: str) -> int:
    return int(container.env[name])


TOKENS: dict[tuple[str, str], str] = {}


def token(container: Container, listener: str) -> str:
    """The listener's token, added with `birdflow listeners add` inside the container the first time."""
    if (container.name, listener) not in TOKENS:
        added = container.exec("birdflow", "listeners", "add", listener)
        assert added.returncode == 0, added.stderr
        assert "checked once 'ingest_auth' is on" not in added.stderr  # the .env on the volume turned it on
        TOKENS[container.name, listener] = added.stdout.strip()
    return TOKENS[container.name, listener]


def upload(container: Container, name: str, audio: bytes) -> None:
    response = httpx.post(
        f"http://{LOOPBACK}:{port(container, 'INGEST_PORT')}/recordings_upload",
        files={"file": (name, audio)},
        headers={"Authorization": f"Bearer {token(container, name.split('_')[0])}"},
        timeout=60,
    )
    assert response.status_code == 200, response.text


def ui_login(container: Container) -> str:
    """The Prefect UI's user:password, as `init` wrote it into the volume's .env."""
    [line] = [line for line in (container.data / ".env").read_text().splitlines() if line.startswith("PREFECT_API_")]
    return line.split("=", 1)[1]


def recording_runs(container: Container) -> list[dict]:
    user, _, password = ui_login(container).partition(":")
    response = httpx.post(
        f"http://{LOOPBACK}:{port(container, 'PREFECT_PORT')}/api/flow_runs/filter",
        json={"flows": {"name": {"any_": ["process-recording"]}}},
        auth=(user, password),
        timeout=30,
    )
    response.raise_for_status()
    return response.json()


def test_up_in_the_image_analyses_an_upload_and_the_prefect_ui_shows_its_run(station, sample_48k, tmp_path):
    upload(station, "mic1_20250601T053000Z.wav", sample_48k.read_bytes())
    wait_until(lambda: detection_rows(station), 120, "detections of the upload")
    assert "American Goldfinch" in {row["common_name"] for row in detection_rows(station)}
    [run] = recording_runs(station)
    assert run["name"] == "mic1-20250601T053000Z" and run["state_type"] == "COMPLETED"
    # the model converted in the image's build: the start-up check measured both runtimes on it, nothing converted
    # at run time (the converter is not in the image)
    assert re.search(r"BirdNET runtime \S+ \(.*onnxruntime [0-9.]+ windows/s", station.logs()), station.logs()[-3000:]
    assert "converted to ONNX" not in station.logs() and not (station.data / "models").exists()
    # the UI the station serves: Prefect writes its copy under the volume, not into site-packages; its login first,
    # then the runs page, as a run link in the station's log leads there
    assert "UI static directory" not in station.logs()
    assert (station.data / "prefect" / "ui").is_dir()
    ui = f"http://{LOOPBACK}:{port(station, 'PREFECT_PORT')}"
    [link] = re.findall(rf"View at ({re.escape(ui)}/login\?redirect=\S+{run['id']})", station.logs())
    page = Page(tmp_path / "browser")
    try:
        log_in(page, link, ui_login(station))
        page.wait_for("document.body.innerText.includes('mic1-20250601T053000Z')")
        assert page.evaluate("location.pathname") == f"/runs/flow-run/{run['id']}"
        page.screenshot(tmp_path / "run.png")
    finally:
        page.close()
    assert (tmp_path / "run.png").stat().st_size > 20_000  # a page was drawn, not an empty frame


def test_the_image_runs_as_its_own_user_not_root(station):
    assert station.exec("id", "-u").stdout.strip() == "1000"
    users = station.podman("top", station.name, "user", "args").stdout.splitlines()[1:]
    assert len(users) >= 4 and all(line.split()[0] == "birdflow" for line in users), (
        users
    )  # up, server, ingest, executor


def stream_slowly(ingest_port: int, audio: bytes, secret: str, stop: threading.Event) -> None:
    """A listener streaming in real time until `stop` (or until the station cuts it off)."""
    frames = frames_of(audio)
    with socket.create_connection((LOOPBACK, ingest_port), timeout=30) as sock:
        sock.sendall(
            f"POST /recordings_stream?listener_id=streamer HTTP/1.1\r\nHost: {LOOPBACK}\r\n"
            f"Authorization: Bearer {secret}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        page = 32768 + 6  # a frame: its header and one page of audio (0.34 s at 48 kHz)
        for offset in range(0, len(frames), page):
            if stop.is_set():
                return
            chunk = frames[offset : offset + page]
            try:
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            except OSError:
                return  # the station went down
            time.sleep(0.34)


def test_the_volume_keeps_everything_across_stop_and_start_with_a_stream_in_progress(station, sample_48k):
    wait_until(lambda: detection_rows(station), 120, "the station's first recording")  # whatever ran first
    runs_before = {run["id"] for run in recording_runs(station)}
    stop_streaming = threading.Event()
    listener = threading.Thread(
        target=stream_slowly,
        args=(port(station, "INGEST_PORT"), sample_48k.read_bytes(), token(station, "streamer"), stop_streaming),
    )
    listener.start()
    try:
        wait_until(lambda: any((station.data / "partial").glob("stream_*")), 30, "the stream's partial file")
        time.sleep(6)  # two windows of audio
        took = station.stop(STOP_GRACE_S)
    finally:
        stop_streaming.set()
        listener.join(30)
    state = station.state()
    assert not state["Running"] and state["ExitCode"] == 0, state  # it stopped itself, nothing was killed
    assert took < STOP_GRACE_S
    assert not list((station.data / "partial").glob("stream_*"))  # published on the way down
    station.start()
    wait_healthy(station)
    wait_until(
        lambda: any(row["listener_id"] == "streamer" for row in detection_rows(station)),
        120,
        "the recording that was streaming at the stop, analysed after the start",
    )
    # what was there before the stop is still there: run history, detections, the archive
    assert runs_before <= {run["id"] for run in recording_runs(station)}
    assert {"mic1", "streamer"} <= {row["listener_id"] for row in detection_rows(station)}
    assert {path.name.split("_")[0] for path in (station.data / "archive").rglob("*.flac")} >= {"mic1", "streamer"}


def test_the_commands_people_run_inside_the_image(station, sample_48k):
    wait_until(lambda: detection_rows(station), 120, "the station's first recording")
    assert len(token(station, "mic9")) >= 20
    assert "mic9" in station.exec("birdflow", "listeners", "list").stdout
    table = station.exec("birdflow", "detections")
    assert table.returncode == 0 and "American Goldfinch" in table.stdout, table.stderr
    counted = station.exec(
        "birdflow", "sql", "SELECT common_name, count(*) AS n FROM detections GROUP BY 1", "--format", "csv"
    )
    assert counted.returncode == 0 and "American Goldfinch" in counted.stdout, counted.stderr
    # a card dump copied into the container, backfilled as a dry run (no server needed)
    station.exec("mkdir", "-p", "/tmp/card")
    station.podman("cp", str(sample_48k), f"{station.name}:/tmp/card/mic1_20250602T060000Z.wav")
    dry = station.podman(
        "exec",
        "--env=BACKFILL_ROOTS=/tmp/card",
        station.name,
        "birdflow",
        "backfill",
        "/tmp/card",
        "--dry-run",
        check=False,
    )
    assert dry.returncode == 0 and "mic1_20250602T060000Z" in dry.stdout + dry.stderr, dry.stdout + dry.stderr


def test_init_in_the_image_writes_settings_and_secrets_onto_the_volume(podman, tmp_path):
    container = Container(podman, IMAGE, "unused", tmp_path / "volume", {})
    container.data.mkdir()
    os.chown(container.data, 1000, 1000)
    done = container.once("init", "--station", "pi-9")
    assert done.returncode == 0, done.stderr
    settings, secrets = container.data / "settings.yaml", container.data / ".env"
    assert "station_id: pi-9" in settings.read_text()
    assert secrets.stat().st_uid == 1000 and secrets.stat().st_mode & 0o077 == 0
    # every command reads them from the volume
    config = container.once("prometheus-config")
    assert config.returncode == 0 and "station: pi-9" in config.stdout, config.stderr


def test_reviews_in_the_image_with_docker_exec_style_commands(station, mosquitto, tmp_path):
    """The review story, each command as docs/fleet.md shows it: `docker exec <container> birdflow ...`, in
    /data without saying so, so the station's own settings and secrets are read."""
    require_sample(SOUNDSCAPE)
    subscriber = Subscriber(mosquitto, "pi-box")

    def birdflow(*args: str) -> str:
        done = station.exec("birdflow", *args)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    try:
        upload(station, "mic1_20250601T060000Z.mp3", SOUNDSCAPE.read_bytes())
        shape = Shape(
            station_id="pi-box",
            ui_url=f"http://{LOOPBACK}:{port(station, 'PREFECT_PORT')}",
            cli=birdflow,
            export_dir=("/data/exports", station.data / "exports"),
            subscriber=subscriber,
            profile=tmp_path / "browser",
            ui_login=ui_login(station),
        )
        run_review_story(shape, lambda: station.logs()[-3000:])
    finally:
        subscriber.close()
    # the station's own id in what it exports, not the default's
    assert "pi-box" in (station.data / "exports" / "detections.csv").read_text()
    # `docker run <image> <command>` too, through the entrypoint, on the same volume
    listed = station.once("review", "list", "--format", "json")
    assert listed.returncode == 0 and listed.stdout.startswith("["), listed.stderr


def test_every_birdflow_command_passes_through_the_entrypoint(station):
    """`birdflow --help` of a station's install, every command of it run as `docker run <image> <command> --help`
    (one container, the entrypoint called once per command)."""
    commands = birdflow_commands(plugins=False)
    loop = f"for command in {' '.join(commands)}; do /app/entrypoint.sh $command --help | head -n 1; done"
    shown = station.podman("run", "--rm", "--entrypoint=sh", IMAGE, "-c", loop).stdout.splitlines()
    assert [line.split()[:3] for line in shown] == [["usage:", "birdflow", name] for name in commands]


@pytest.mark.skipif(
    os.environ.get("BIRDFLOW_TEST_ARM64") != "1",
    reason='linux/arm64 under qemu emulation takes ~10 minutes (set BIRDFLOW_TEST_ARM64=1; docs/fleet.md, "The image")',
)
def test_the_arm64_image_analyses_a_recording_under_emulation(tmp_path, sample_48k):
    problem = podman_problem() or emulation_problem("arm64")
    if problem:
        pytest.skip(problem)
    results = build_and_try(
        tmp_path, "arm64", "tflite-runtime", "birdflow:test-arm64", sample_48k, say=lambda text: None
    )
    assert results["recording_analysed"] and results["detections"] >= 1, results
    assert results["image_mb"] <= 900, results
