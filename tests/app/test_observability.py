"""Metrics reach a real Prometheus: the generated agent config scrapes birdflow and remote-writes, with
basic auth, to a central Prometheus; and the Grafana dashboard only queries metrics birdflow exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from birdflow.core.detections import SCHEMA
from birdflow.runtime import metrics
from birdflow_tools.testbed import LOOPBACK, free_port, wait_until
from tests.conftest import PROJECT

DASHBOARD = PROJECT / "deployments" / "kubernetes" / "grafana" / "dashboards" / "birdflow.json"
DATASOURCES = PROJECT / "deployments" / "kubernetes" / "grafana" / "provisioning" / "datasources" / "birdflow.yml"


def exported_series() -> set[str]:
    """Every series name birdflow's metrics produce (counters as *_total, histograms as _bucket/_sum/_count)."""
    names: set[str] = set()
    from prometheus_client.metrics import MetricWrapperBase

    found = [
        metric
        for value in vars(metrics).values()
        for metric in (value.values() if isinstance(value, dict) else [value])
    ]
    for value in found:  # a dict of metrics (the listener health gauges) counts by its members
        if not isinstance(value, MetricWrapperBase):
            continue
        for family in value.describe():
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}[family.type]
            names.update(family.name + suffix for suffix in suffixes)
    return names


def test_dashboard_queries_only_name_exported_metrics_and_real_columns():
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target for panel in dashboard["panels"] for target in panel["targets"]]
    promql = [target["expr"] for target in queries if "expr" in target]
    promql += [dashboard["templating"]["list"][0]["query"]["query"]]
    used = {name for expr in promql for name in re.findall(r"\bbirdflow_[a-z_]+", expr)}
    assert len(used) >= 10
    assert used <= exported_series(), used - exported_series()
    sql = " ".join(target["rawSql"] for target in queries if "rawSql" in target)
    assert "FROM detections" in sql  # the default influx_table
    for column in ("common_name", "confidence", "time"):
        assert column in SCHEMA.names and column in sql
    uids = {source["uid"] for source in yaml.safe_load(DATASOURCES.read_text())["datasources"]}
    assert {panel["datasource"]["uid"] for panel in dashboard["panels"]} <= uids


@pytest.fixture
def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if not binary:
        pytest.skip("Prometheus is not installed (Debian: apt install prometheus; .ci/run does)")
    return binary


def start(command: list[str], log: Path, env=None) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def test_agent_config_scrapes_birdflow_and_remote_writes_to_central_prometheus(tmp_path, prometheus_binary):
    import bcrypt

    ingest_port, central_port, agent_port = free_port(), free_port(), free_port()
    password = "s3cret-remote-write"
    settings_file = tmp_path / "settings.yaml"
    settings_file.write_text(
        yaml.safe_dump(
            {
                "station_id": "obs-test",
                "data_dir": str(tmp_path / "data"),
                "ingest_host": LOOPBACK,
                "ingest_port": ingest_port,
                "prometheus_scrape_interval_s": 1,
                "prometheus_remote_write_url": f"http://{LOOPBACK}:{central_port}/api/v1/write",
                "prometheus_remote_write_user": "birdflow",
            }
        )
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env["PROMETHEUS_REMOTE_WRITE_PASSWORD"] = password
    cli = [sys.executable, "-m", "birdflow.app.cli", "--settings", str(settings_file)]
    agent_dir = tmp_path / "agent"
    subprocess.run(cli + ["prometheus-config", "--output", str(agent_dir)], env=env, check=True, capture_output=True)
    config = yaml.safe_load((agent_dir / "prometheus.yml").read_text())
    assert config["remote_write"][0]["basic_auth"]["username"] == "birdflow"
    assert password not in (agent_dir / "prometheus.yml").read_text()

    central_dir = tmp_path / "central"
    central_dir.mkdir()
    (central_dir / "prometheus.yml").write_text(yaml.safe_dump({"global": {"scrape_interval": "15s"}}))
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    (central_dir / "web.yml").write_text(yaml.safe_dump({"basic_auth_users": {"birdflow": hashed}}))
    processes = [
        start(cli + ["ingest"], tmp_path / "ingest.log", env),
        start(
            [
                prometheus_binary,
                f"--config.file={central_dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={central_dir / 'data'}",
                f"--web.listen-address={LOOPBACK}:{central_port}",
                f"--web.config.file={central_dir / 'web.yml'}",
                "--web.enable-remote-write-receiver",
            ],
            tmp_path / "central.log",
        ),
        start(
            [
                prometheus_binary,
                "--enable-feature=agent",
                f"--config.file={agent_dir / 'prometheus.yml'}",
                f"--storage.agent.path={agent_dir / 'data'}",
                f"--web.listen-address={LOOPBACK}:{agent_port}",
            ],
            tmp_path / "agent.log",
        ),
    ]
    try:
        auth = ("birdflow", password)

        def central_has(query: str) -> bool:
            response = httpx.get(
                f"http://{LOOPBACK}:{central_port}/api/v1/query", params={"query": query}, auth=auth, timeout=5
            )
            return response.status_code == 200 and bool(response.json()["data"]["result"])

        wait_until(
            lambda: central_has('birdflow_disk_free_bytes{station="obs-test"} > 0'),
            90,
            "birdflow metrics in the central Prometheus",
        )
        assert central_has('up{job="birdflow", station="obs-test"} == 1')
        unauthorised = httpx.get(f"http://{LOOPBACK}:{central_port}/api/v1/query", params={"query": "up"}, timeout=5)
        assert unauthorised.status_code == 401
    finally:
        for process in processes:
            stop(process)
