"""A fleet on the central side as the manifests run it: two Prefect API processes on one Postgres, Prefect's
services in their own process, Redis between them, two stations each on its own API process. Each station's
runs stay in its pool; a run created through one API process is executed by its station and seen through the
other; Prefect's vacuum holds the history flat over compressed days."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest

from birdflow.flows.process_recording import RECORDING_TASKS
from birdflow_tools.central import manifest_settings
from birdflow_tools.fleet_bench import FleetOptions, drain_phase, retention_phase, running_fleet, station_view
from birdflow_tools.testbed import prefect_post

pytestmark = pytest.mark.e2e


def run_state(api_url: str, run_id: str) -> str:
    import httpx

    return httpx.get(f"{api_url}/flow_runs/{run_id}", timeout=10).json()["state_type"]


SHORT_OF_TASK_RUNS = (
    "SELECT count(*) FROM flow_run JOIN flow ON flow.id = flow_run.flow_id WHERE flow.name = 'process-recording'"
    " AND flow_run.state_type = 'COMPLETED'"
    f" AND (SELECT count(*) FROM task_run WHERE flow_run_id = flow_run.id) <> {len(RECORDING_TASKS)}"
)


def every_run_has_its_task_runs(central, timeout_s: float = 30) -> None:
    """Every completed recording run has its task runs (analyze, write detections, archive) in the database."""
    deadline = time.monotonic() + timeout_s
    while short := central.query(SHORT_OF_TASK_RUNS)[0][0]:
        assert time.monotonic() < deadline, f"{short} run(s) without their task runs"
        time.sleep(1)


def test_two_api_processes_on_postgres_and_redis_serve_two_stations(sample_48k):
    assert manifest_settings()["PREFECT_MESSAGING_BROKER"] == "prefect_redis.messaging"  # what is under test
    options = FleetOptions.quick(
        sample=sample_48k,
        stations=2,
        api_processes=2,
        recordings_per_station=3,
        compressed_days=3,
        retention_days=2,
        recordings_per_day=1,
    )
    said: list[str] = []
    with running_fleet(options, said.append) as (central, stacks, _):
        first, second = stacks
        assert (first.api_url, second.api_url) == (central.api_url(0), central.api_url(1))
        assert central.api_url(0) != central.api_url(1)

        drain = drain_phase(options, central, stacks, said.append)
        assert drain["recordings"] == 6 and drain["rows_per_run"]["flow_run"] == 1.0
        assert drain["rows_per_run"]["events"] == 0.0  # no stored event feed centrally
        assert drain["central_cpu_s_per_recording"] > 0
        # each run's four task runs are recorded by the services process: their states arrive as events through
        # Redis, whichever API process the station talks to (now and then a few seconds late)
        every_run_has_its_task_runs(central)

        for view in station_view(central, stacks):
            station = view["station"]
            assert view["completed_runs"] == view["stored_recordings"] == 3, view
            assert view["runs_seen_through_each_api_process"] == [3, 3], view
            assert view["runs_in_other_pools"] == 0, view
            assert view["deployments"] == [
                f"maintenance/{station}",
                f"process-recording/{station}",
                f"review-detection/{station}",
            ], view

        # a rerun created through API process 1 of a run of the station that talks to API process 2
        api_one, api_two = central.api_url(0), central.api_url(1)
        [done] = prefect_post(api_one, "flow_runs/filter", {**second.recording_runs, "limit": 1})
        rerun = prefect_post(
            api_one,
            f"deployments/{done['deployment_id']}/create_flow_run",
            {"parameters": done["parameters"], "name": "rerun-through-api-one"},
        )
        assert rerun["work_pool_name"] == "birdflow-station02"
        deadline = time.monotonic() + 90
        while run_state(api_two, rerun["id"]) != "COMPLETED":
            assert time.monotonic() < deadline, run_state(api_two, rerun["id"])
            time.sleep(1)
        assert run_state(api_one, rerun["id"]) == "COMPLETED"
        assert second.completed_runs() == 4 and first.completed_runs() == 3

        # compressed days: the vacuum deletes runs past the two-day window, so the history stops growing
        days = retention_phase(options, central, stacks, said.append)["days"]
        assert [day["day"] for day in days] == [1, 2, 3]
        assert days[0]["flow_run"] >= 9  # the 7 runs above and day 1's two, all inside the window
        assert days[1]["flow_run"] == days[2]["flow_run"] < days[0]["flow_run"]
        assert days[1]["log"] == days[2]["log"] <= days[2]["flow_run"]
        assert days[2]["task_run"] <= 4 * days[2]["flow_run"]
        every_run_has_its_task_runs(central)


def measured(central_cpu: float, database_bytes: float, flow_runs: float, own_history: bool) -> dict:
    """A fleet bench's results, as run_fleet_bench returns them, with the measures that differ between modes."""
    drain = {
        "recordings": 16,
        "wall_s": 4.0,
        "runs_per_s": 4.0,
        "central_cpu_s_per_recording": central_cpu,
        "central_cpu_s_per_recording_by_role": {"api": central_cpu},
        "station_cpu_s_per_recording": 0.4 if own_history else 0.25,
        "central_cores_busy": 1.0,
        "cores_busy_per_api_process": [1.0],
        "database_bytes_per_run": database_bytes,
        "rows_per_run": {"flow_run": flow_runs, "task_run": 4 * flow_runs},
        "latency_p50_s": 1.0,
        "latency_p95_s": 2.0,
    }
    rate = {"steps": [], "sustained_runs_per_s": 4.0, "limit_reached": False}
    return {"cores": 2, "stations": 2, "api_processes": 1, "own_history": own_history, "drain": drain, "rate": rate}


def test_both_modes_print_side_by_side_then_each_in_full():
    from birdflow_tools.fleet_bench import modes_side_by_side

    rows = dict(
        modes_side_by_side({"central": measured(0.259, 33280, 1.0, False), "own": measured(0.015, 0.0, 0.0, True)})
    )
    assert rows["central CPU per recording"] == "every run central: 0.259 s | each station's own history: 0.015 s"
    assert rows["central database per recording"] == (
        "every run central: 32.5 KB, 5.0 rows | each station's own history: 0.0 KB, 0.0 rows"
    )
    assert rows["station CPU per recording"] == "every run central: 0.250 s | each station's own history: 0.400 s"
    assert rows["every run central: fleet"].endswith("every run on the central Prefect")
    assert rows["each station's own history: fleet"].endswith(
        "each station's run history on its own Prefect (central_api_url)"
    )


def test_simulated_stations_send_the_central_side_their_hours_events_confirmations_and_metrics():
    """The simulator is birdflow's relay over station folders: three stations, two compressed hours, all hearing
    the same rare species in the first; on a central side run as the own-history overlay runs it. Their metrics
    reach a central Prometheus (an agent remote-writes at most every 5 s)."""
    from birdflow_tools.central import CentralPrefect
    from birdflow_tools.fleet_sim import SimulatedStations, fleet_projection, remote_write, simulate

    tmp_path = Path(tempfile.mkdtemp(prefix="birdflow-sim-"))
    tmp_path.chmod(0o755)  # Postgres runs as its own user when we are root (pytest's folders are private)
    sim = SimulatedStations(
        count=3,
        listeners=4,
        hours=2,
        hour_s=1,
        rare_share=1.0,
        rare_species=1,
        metrics_s=11,
        scrape_interval_s=1,
        confirm_checks_s=(6.0, 15.0),
    )
    # the persister flushes every second, but on Redis messaging an event reaches it ~5 s after it was sent
    # (Prefect 3.9): the relays match their sightings 6 s after sending them, and again should that be too soon
    flush = {"PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "1"}
    central = CentralPrefect(tmp_path / "central", settings=flush, own_history=True)
    try:
        central.start()
        simulated = simulate(sim, central, tmp_path / "stations", lambda text: None)
        hour_runs = central.query(
            "SELECT flow_run.name FROM flow_run JOIN flow ON flow.id = flow_run.flow_id"
            " WHERE flow.name = 'station-hour' AND flow_run.state_type = 'COMPLETED'"
        )
        confirmed = central.query("SELECT count(*) FROM events WHERE event = 'birdflow.detection.confirmed'")[0][0]
    finally:
        central.stop()
        shutil.rmtree(tmp_path / "central", ignore_errors=True)
    assert simulated["station_hours"] == len(hour_runs) == 6
    assert sorted(name.split()[0] for (name,) in hour_runs) == [
        "sim001",
        "sim001",
        "sim002",
        "sim002",
        "sim003",
        "sim003",
    ]
    assert simulated["rows_per_station_hour"]["artifact"] == 1.0 and simulated["rows_per_station_hour"]["task_run"] == 0
    # the rare species is rare at each station once; the three sightings are one confirmation, whoever sent it
    assert simulated["rare_events"] == 3 and simulated["confirmed_events"] == confirmed == 1
    assert simulated["central_cpu_s_per_station_hour"] > 0 and simulated["database_bytes_per_station_hour"] > 0
    text = '# HELP birdflow_backlog x\nbirdflow_backlog{station="real"} 0\nbirdflow_up{station="real"} 1\n'
    metrics = remote_write(sim, text, "real", tmp_path / "metrics", lambda text: None)
    assert metrics["series_per_station"] == 2 and metrics["samples_per_s"] > 0
    projection = fleet_projection(simulated, metrics, sim.listeners, sim.recording_s, stations=100)
    # (the central Prometheus may spend no measurable CPU on three stations' six series in 11 s)
    assert projection["prometheus_cores"] == pytest.approx(100 * metrics["central_cpu_s_per_station_day"] / 86400)
    assert projection["central_cores"] > projection["prometheus_cores"] >= 0
    assert projection["central_database_bytes"] == 100 * 24 * 14 * simulated["database_bytes_per_station_hour"]
    shutil.rmtree(tmp_path, ignore_errors=True)
