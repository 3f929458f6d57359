"""docker/ and balena/: what can be checked without a Docker engine.

The compose files parse and point at files that exist, every birdflow variable they set is a real
setting, the Dockerfile is multi-stage, non-root and health-checked, and the image's entrypoint and the
fleet-variable script run here, outside Docker.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import httpx
import pytest
import yaml

from birdflow.app.prefect_env import TASK_RUN_RECORDER_BATCHING, VACUUM
from birdflow.settings import Settings
from birdflow_tools.stack import Stack
from birdflow_tools.testbed import LOOPBACK, free_port, wait_until
from tests.conftest import PROJECT

DOCKER, BALENA = PROJECT / "docker", PROJECT / "balena"
SETTING_VARIABLES = {name.upper() for name in Settings.flat_fields()}
# services published beyond the box, each asking for credentials (docs/security.md)
PUBLISHED_WITH_LOGIN = {
    "docker-compose.yml": {"aggregator", "prefect", "grafana"},
    "docker-compose.central.yml": {"prefect", "grafana", "influxdb3", "prometheus", "seaweedfs"},
}
COMPOSE_FILES = [DOCKER / "docker-compose.yml", DOCKER / "docker-compose.central.yml", BALENA / "docker-compose.yml"]


def test_compose_files_reference_existing_files_volumes_and_settings():
    for path in COMPOSE_FILES:
        compose = yaml.safe_load(path.read_text())
        named = set(compose.get("volumes", {}))
        for name, service in compose["services"].items():
            if "build" in service:
                context = (path.parent / service["build"]["context"]).resolve()
                assert (context / service["build"]["dockerfile"]).is_file(), (path, name)
            for volume in service.get("volumes", []):
                source = volume.split(":")[0]
                if source.startswith("."):
                    assert (path.parent / source).exists(), (path, name, source)
                else:
                    assert source in named, (path, name, source)
            if service.get("build"):  # the birdflow image: every variable it sets must be a setting
                environment = service.get("environment", {})
                assert set(environment) <= SETTING_VARIABLES, set(environment) - SETTING_VARIABLES
            if str(service.get("image", "")).startswith("prefecthq/prefect"):  # run retention by Prefect's vacuum
                assert service["environment"]["PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED"] == VACUUM, path
                assert service["environment"]["PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED"] == "false", path
                assert "PREFECT_SERVER_API_AUTH_STRING" in service["environment"], path  # and its own auth
                # task-run states written in batches, as `up` does for its embedded server
                assert TASK_RUN_RECORDER_BATCHING.items() <= service["environment"].items(), path
            if name not in PUBLISHED_WITH_LOGIN.get(path.name, ()):  # the rest answers on loopback only
                assert all(port.startswith("127.0.0.1:") for port in service.get("ports", [])), (path, name)
    for path in COMPOSE_FILES:  # no secret has a default a stranger could guess
        defaults = re.findall(r"\$\{(\w*(?:PASSWORD|SECRET|KEY)\w*):-", path.read_text())
        assert not defaults, (path.name, defaults)
    station = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())["services"]
    assert station["prefect"]["ports"] == ["${UI_BIND:-127.0.0.1}:4200:4200"]  # plain HTTP: loopback unless asked
    assert station["grafana"]["ports"] == ["${UI_BIND:-127.0.0.1}:3000:3000"]
    balena = yaml.safe_load((BALENA / "docker-compose.yml").read_text())
    assert str(balena["version"]).startswith("2.")
    devices = yaml.safe_load((BALENA / "balena.yml").read_text())["data"]["supportedDeviceTypes"]
    assert {"raspberrypi4-64", "raspberrypi5"} <= set(devices)


def test_dockerfile_is_multi_stage_non_root_health_checked_and_copies_what_exists():
    text = (DOCKER / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.MULTILINE)) >= 2
    assert re.search(r"^USER (?!root)\w+", text, re.MULTILINE) and "HEALTHCHECK" in text
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.MULTILINE):
        for source in line.split()[:-1]:
            assert (PROJECT / source).exists(), source
    assert os.access(DOCKER / "entrypoint.sh", os.X_OK)


def entrypoint(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run([str(DOCKER / "entrypoint.sh"), *args], capture_output=True, text=True, env=env, timeout=120)


def test_entrypoint_runs_outside_docker(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    port = free_port()
    (data / "settings.yaml").write_text(
        yaml.safe_dump({"station_id": "from-volume", "ingest_port": port, "ingest_host": LOOPBACK})
    )
    env = {key: value for key, value in os.environ.items() if key.upper() not in SETTING_VARIABLES}
    env.update(DATA_DIR=str(data), INGEST_PORT=str(port), PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    env.pop("BIRDFLOW_SETTINGS", None)
    assert entrypoint("healthcheck", env=env).returncode == 1  # nothing listens yet
    config = entrypoint("prometheus-config", env=env)
    assert config.returncode == 0 and "station: from-volume" in config.stdout  # settings.yaml on the volume
    ingest = subprocess.Popen(
        [str(DOCKER / "entrypoint.sh"), "ingest"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_until(
            lambda: httpx.get(f"http://{LOOPBACK}:{port}/healthz").status_code == 200, 60, "ingest via the entrypoint"
        )
        assert entrypoint("healthcheck", env=env).returncode == 0
        assert entrypoint("sh", "-c", "echo passthrough", env=env).stdout.strip() == "passthrough"
    finally:
        ingest.terminate()
        ingest.wait(30)


def birdflow_commands(plugins: bool = True) -> list[str]:
    """Every command `birdflow --help` lists; without `plugins`, those of a station's install (no developer tools)."""
    import argparse

    from birdflow.app.cli import build_parser

    parser = build_parser(plugins)
    [commands] = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return sorted(commands.choices)


def test_the_entrypoint_passes_every_birdflow_command_and_runs_other_programs(tmp_path):
    env = {**os.environ, "DATA_DIR": str(tmp_path / "data"), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    for command in birdflow_commands():  # `init` among them, which is also a program where systemd is installed
        done = entrypoint(command, "--help", env=env)
        assert done.returncode == 0 and done.stdout.startswith(f"usage: birdflow {command}"), (command, done.stderr)
    assert entrypoint("review", "list", "--help", env=env).stdout.startswith("usage: birdflow review list")
    assert entrypoint("echo", "a program", env=env).stdout == "a program\n"  # a shell builtin too, but on PATH
    unknown = entrypoint("sing", env=env)
    assert unknown.returncode == 2 and "invalid choice: 'sing'" in unknown.stderr  # birdflow's to refuse


def test_env_to_fleet_loads_what_init_writes(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "birdflow.app.cli", "init", "--dir", str(tmp_path), "--station", "pi-9"],
        check=True,
        capture_output=True,
    )
    env_file = tmp_path / ".env"
    env_file.write_text(env_file.read_text() + "INFLUX_TOKEN_EXTRA='a b'\nlower=x\n")
    result = subprocess.run(
        [str(BALENA / "env-to-fleet.sh"), "north-fleet", str(env_file)],
        capture_output=True,
        text=True,
        env={**os.environ, "DRY_RUN": "1"},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[3] for line in lines] == [
        "STATION_ID",
        "PREFECT_API_AUTH_STRING",
        "METRICS_TOKEN",
        "GRAFANA_ADMIN_PASSWORD",
        "POSTGRES_PASSWORD",
        "UI_BIND",
        "INGEST_AUTH",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "INFLUX_TOKEN_EXTRA",
    ]
    assert lines[0] == "balena env set STATION_ID pi-9 --fleet north-fleet"
    assert lines[-1] == "balena env set INFLUX_TOKEN_EXTRA a\\ b --fleet north-fleet"
    assert "skipping lower" in result.stderr
    missing = subprocess.run(
        [str(BALENA / "env-to-fleet.sh"), "f", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "no such file" in missing.stderr


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> Path:
    """birdflow's wheel (built from this tree, not editable) in a new virtualenv; its dependencies are those of
    this environment, linked in, without birdflow itself or its developer tools. Returns the interpreter."""
    root = tmp_path_factory.mktemp("wheel")
    # built from a copy: an in-tree build keeps a build/ folder whose stale modules could end up in the wheel
    source = root / "source"
    shutil.copytree(
        PROJECT,
        source,
        ignore=shutil.ignore_patterns(".*", "build", "data", "*.egg-info", "__pycache__", "tests", "tools"),
    )
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(root / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    [wheel] = (root / "dist").glob("birdflow-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {"birdflow/settings/settings.example.yaml", "birdflow/core/kaiser_fast.npy"} <= names
    assert not [name for name in names if name.startswith(("birdflow_tools/", "tests/", "birdflow/tools/"))]
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, timeout=120)
    python = root / "venv" / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)], check=True, timeout=300
    )
    ours = sysconfig.get_paths()["purelib"]
    dependencies = root / "dependencies"
    dependencies.mkdir()
    for entry in Path(ours).iterdir():
        if not entry.name.startswith(("birdflow", "__editable__", "_birdflow")) and not entry.name.endswith(".pth"):
            (dependencies / entry.name).symlink_to(entry)
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(site) / "dependencies.pth").write_text(f"{dependencies}\n")
    return python


def test_the_wheel_in_a_fresh_virtualenv_runs_init_up_and_a_recording(installed_wheel, tmp_path, sample_48k):
    where = subprocess.run(
        [str(installed_wheel), "-c", "import birdflow; print(birdflow.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert str(PROJECT) not in where.stdout and "site-packages" in where.stdout, where.stdout + where.stderr
    init = subprocess.run(
        [
            str(installed_wheel),
            "-m",
            "birdflow.app.cli",
            "init",
            "--dir",
            str(tmp_path / "station"),
            "--station",
            "wheel-1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert init.returncode == 0, init.stderr
    assert "station_id: wheel-1" in (tmp_path / "station" / "settings.yaml").read_text()
    stack = Stack(tmp_path / "up", station_id="wheel-1", python=str(installed_wheel))
    stack.root.mkdir()
    try:
        stack.start()
        stack.upload("mic1_20250601T053000Z.wav", sample_48k.read_bytes())
        wait_until(lambda: stack.completed_runs() == 1, 120, "the recording's run")
        listed = stack.cli("detections", "--format", "json")
        assert "American Goldfinch" in listed.stdout, listed.stderr
    finally:
        stack.stop()
