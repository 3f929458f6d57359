"""`birdflow bench --stations N`: a fleet on this machine, measured from the central side.

One central Prefect (tools/birdflow_tools/central.py: Postgres, Redis, K API processes, Prefect's services, with the
Kubernetes manifests' settings) and N stations, each `birdflow up` in its own folder with its own ports,
station id and work pool, spread over the API processes. Phases, in order:
- drain: every station gets M uploads at once; runs/s, the central side's CPU-s per recording, database
  growth per run;
- sustained rate: uploads at growing rates over the fleet until the latency p95 (upload answered ->
  detections stored) passes the limit; the last rate under it is what the fleet sustains here;
- per-station view: each station's runs, pool and deployments, through every API process, and none of
  another station's;
- optional retention over compressed time: each "day" every station sends recordings, then every finished
  run is made a day older in the database; Prefect's vacuum deletes runs past the retention window, so the
  history's rows and bytes stop growing;
- with each station's own history, optionally more stations simulated at compressed time (fleet_sim.py): what
  a station-hour costs the central side, projected to a fleet of `fleet_stations`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from birdflow_tools.bench import PER_RECORDING_ONLY, distinct_uploads, percentile, post_uploads, wait_stored
from birdflow_tools.central import HISTORY_TABLES, CentralPrefect
from birdflow_tools.fleet_sim import SimulatedStations, fleet_projection, projection_rows, remote_write, simulate
from birdflow_tools.stack import Stack, environment_without_settings
from birdflow_tools.testbed import prefect_post

TERMINAL = "('COMPLETED', 'FAILED', 'CANCELLED', 'CRASHED')"
# one compressed day: every finished run (and every stored event) a day older
AGE_ONE_DAY = (
    f"UPDATE flow_run SET start_time = start_time - interval '1 day', end_time = end_time - interval '1 day',"
    f" expected_start_time = expected_start_time - interval '1 day' WHERE state_type IN {TERMINAL}",
    "UPDATE events SET occurred = occurred - interval '1 day'",
    "UPDATE event_resources SET occurred = occurred - interval '1 day'",
)


@dataclass
class FleetOptions:
    sample: Path
    stations: int = 3
    api_processes: int = 1
    recordings_per_station: int = 30  # uploaded at once, for the drain
    first_rate: float = 1.0  # runs/s over the fleet, first step of the sustained-rate phase
    rate_factor: float = 1.4
    max_rate: float = 30.0
    step_seconds: float = 20.0
    latency_limit_s: float = 5.0
    compressed_days: int = 0  # 0: no retention phase
    retention_days: int = 3
    recordings_per_day: int = 4  # per station
    # each station keeps its recordings' runs on its own embedded Prefect and relays to the central one
    # (central_api_url) instead of running them there
    own_history: bool = False
    executor_workers: int | None = None
    # with own_history: the rest of a fleet, simulated (fleet_sim.py), and the fleet it is projected to
    simulated: SimulatedStations | None = None
    fleet_stations: int = 100

    @classmethod
    def quick(cls, **overrides) -> FleetOptions:
        values: dict[str, Any] = dict(
            stations=2, recordings_per_station=8, step_seconds=8.0, first_rate=2.0, rate_factor=2.0, max_rate=8.0
        )
        values.update(overrides)
        return cls(**values)

    def central_settings(self) -> dict[str, str]:
        """A retention window of `retention_days` and a vacuum every 2 s when days are compressed."""
        if not self.compressed_days:
            return {}
        return {
            "PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD": str(self.retention_days * 86400),
            "PREFECT_SERVER_EVENTS_RETENTION_PERIOD": f"P{self.retention_days}D",
            "PREFECT_SERVER_SERVICES_DB_VACUUM_LOOP_SECONDS": "2",
        }


def station_ids(count: int) -> list[str]:
    return [f"station{number + 1:02d}" for number in range(count)]


def start_fleet(options: FleetOptions, root: Path, resources: ExitStack, say: Callable[[str], None]):
    """The central side, its work pools (`birdflow central-setup`), then the stations one by one."""
    say(f"central side: Postgres, Redis, {options.api_processes} Prefect API process(es), Prefect's services")
    central = CentralPrefect(
        root / "central", options.api_processes, settings=options.central_settings(), own_history=options.own_history
    )
    resources.callback(central.stop)
    central.start()
    stations = station_ids(options.stations)
    setup = subprocess.run(
        [
            sys.executable,
            "-m",
            "birdflow.app.cli",
            "central-setup",
            "--stations",
            ",".join(stations),
            "--pool-limit",
            "8",
        ],
        env={
            **environment_without_settings(),
            "PREFECT_API_URL": central.api_url(0),
            "DATA_DIR": str(root / "central" / "setup"),
        },
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if setup.returncode != 0:
        raise RuntimeError(f"birdflow central-setup failed: {setup.stderr.strip()[-1000:]}")
    stacks = []
    for number, station in enumerate(stations):
        # stations spread over the API processes
        api = {"central_api_url" if options.own_history else "prefect_api_url": central.api_url(number)}
        settings = {
            **api,
            "work_pool": f"birdflow-{station}",
            "maintenance_interval_s": 86400,  # no compaction of the detection files the bench times
            **PER_RECORDING_ONLY,
            **({"executor_workers": options.executor_workers} if options.executor_workers else {}),
        }
        (root / station).mkdir()
        stack = Stack(root / station, station_id=station, settings=settings)
        resources.callback(stack.stop)
        say(f"station {station} on API process {number % options.api_processes + 1}")
        stack.start()
        stacks.append(stack)
    return central, stacks


def fleet_uploads(options: FleetOptions, stacks: list[Stack], per_station: int, first: int) -> dict[str, list]:
    """station -> its uploads: every recording of the fleet different (numbered from `first`, 10,000 per station)."""
    return {
        stack.station_id: distinct_uploads(options.sample, per_station, first=first + number * 10_000)
        for number, stack in enumerate(stacks)
    }


def send_and_wait(stacks: list[Stack], uploads: dict[str, list], timeout_s: float, interval_s: float = 0.0):
    """Every station's uploads at once (each `interval_s` apart), then until each recording's detections are
    stored and its run completed. Returns station -> recording id -> when its upload was answered, and when
    its detections were stored."""
    completed_before = {stack.station_id: stack.completed_runs() for stack in stacks}

    async def everything():
        return await asyncio.gather(
            *(
                post_uploads(stack.url, uploads[stack.station_id], concurrency=4, interval_s=interval_s)
                for stack in stacks
            )
        )

    sent = dict(zip((stack.station_id for stack in stacks), asyncio.run(everything())))
    stored = {
        stack.station_id: wait_stored(stack, set(sent[stack.station_id]), timeout_s, lambda done: None)
        for stack in stacks
    }
    deadline = time.monotonic() + 60  # detections are stored before a run's archive task ends
    for stack in stacks:
        while stack.completed_runs() < completed_before[stack.station_id] + len(sent[stack.station_id]):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"station {stack.station_id}: runs stored but not completed; log:\n{stack.log_tail()}"
                )
            time.sleep(0.2)
    return sent, stored


def latencies(sent: dict[str, dict[str, float]], stored: dict[str, dict[str, float]]) -> list[float]:
    return [stored[station][key] - answered for station, times in sent.items() for key, answered in times.items()]


def stations_cpu(stacks: list[Stack]) -> float:
    """CPU-s of every station process: the aggregator, and a station's own Prefect server and database if any."""
    return sum(sum(cpu for role, cpu in stack.cpu().items() if role != "ingest") for stack in stacks)


def drain_phase(options: FleetOptions, central: CentralPrefect, stacks: list[Stack], say) -> dict:
    total = options.recordings_per_station * len(stacks)
    say(f"drain: {options.recordings_per_station} uploads to each of {len(stacks)} stations at once")
    uploads = fleet_uploads(options, stacks, options.recordings_per_station, first=0)
    history0, cpu0, api0 = central.history(), central.cpu(), central.api_cpu()
    stations_cpu0 = stations_cpu(stacks)
    wall0 = time.time()
    sent, stored = send_and_wait(stacks, uploads, 120 + 5 * total)
    wall = max(max(times.values()) for times in stored.values()) - wall0
    time.sleep(2)  # the task-run recorder writes in batches, each at most a second late
    cpu, history, api = central.cpu(), central.history(), central.api_cpu()
    spent = {role: cpu[role] - cpu0[role] for role in cpu}
    waits = latencies(sent, stored)
    return {
        "recordings": total,
        "wall_s": wall,
        "runs_per_s": total / wall,
        "central_cpu_s_per_recording": sum(spent.values()) / total,
        "central_cpu_s_per_recording_by_role": {role: value / total for role, value in spent.items()},
        "station_cpu_s_per_recording": (stations_cpu(stacks) - stations_cpu0) / total,
        "central_cores_busy": sum(spent.values()) / wall,
        "cores_busy_per_api_process": [(after - before) / wall for before, after in zip(api0, api)],
        "database_bytes_per_run": (history["database_bytes"] - history0["database_bytes"]) / total,
        "rows_per_run": {table: (history[table] - history0[table]) / total for table in HISTORY_TABLES},
        "latency_p50_s": percentile(waits, 0.5),
        "latency_p95_s": percentile(waits, 0.95),
    }


def rate_phase(options: FleetOptions, central: CentralPrefect, stacks: list[Stack], say) -> dict:
    """Uploads at growing rates over the fleet; each step is sent, drained and timed before the next."""
    steps, rate, first = [], options.first_rate, 1_000_000
    while rate <= options.max_rate + 1e-9:
        per_station = max(1, round(rate * options.step_seconds / len(stacks)))
        interval = len(stacks) / rate
        say(f"sustained rate: {rate:.1f} runs/s over the fleet for {options.step_seconds:.0f} s")
        uploads = fleet_uploads(options, stacks, per_station, first)
        first += 100_000
        cpu0 = central.cpu()
        wall0 = time.time()
        sent, stored = send_and_wait(stacks, uploads, 120 + 5 * per_station * len(stacks), interval_s=interval)
        wall = max(max(times.values()) for times in stored.values()) - wall0
        spent = sum(central.cpu().values()) - sum(cpu0.values())
        waits = latencies(sent, stored)
        steps.append(
            {
                "offered_runs_per_s": rate,
                "runs": len(waits),
                "achieved_runs_per_s": len(waits) / wall,
                "latency_p50_s": percentile(waits, 0.5),
                "latency_p95_s": percentile(waits, 0.95),
                "central_cores_busy": spent / wall,
            }
        )
        if steps[-1]["latency_p95_s"] > options.latency_limit_s:
            break
        rate *= options.rate_factor
    within = [step for step in steps if step["latency_p95_s"] <= options.latency_limit_s]
    return {
        "steps": steps,
        "sustained_runs_per_s": max((step["achieved_runs_per_s"] for step in within), default=0.0),
        "limit_reached": len(within) < len(steps),
    }


def station_view(central: CentralPrefect, stacks: list[Stack]) -> list[dict]:
    """What each station sees: its runs (through every API process), its pool's deployments, others' runs."""
    pools = {stack.station_id: f"birdflow-{stack.station_id}" for stack in stacks}
    flows = {flow["id"]: flow["name"] for flow in stacks[0].api("flows/filter", {})}
    view = []
    for stack in stacks:
        station, pool = stack.station_id, pools[stack.station_id]
        others = [name for name in pools.values() if name != pool]
        deployments = stack.api("deployments/filter", {"work_pools": {"name": {"any_": [pool]}}})
        seen = [
            int(prefect_post(central.api_url(index), "flow_runs/count", stack.recording_runs))
            for index in range(central.api_processes)
        ]
        view.append(
            {
                "station": station,
                "work_pool": pool,
                "deployments": sorted(f"{flows[item['flow_id']]}/{item['name']}" for item in deployments),
                "stored_recordings": len(stack.stored_times()),
                "completed_runs": stack.completed_runs(),
                "runs_seen_through_each_api_process": seen,
                "runs_in_other_pools": int(
                    stack.api("flow_runs/count", {**stack.recording_runs, "work_pools": {"name": {"any_": others}}})
                )
                if others
                else 0,
            }
        )
    return view


def retention_phase(options: FleetOptions, central: CentralPrefect, stacks: list[Stack], say) -> dict:
    """Compressed days; after each, the run history's rows and the database's bytes once the vacuum passed."""
    days, first = [], 2_000_000  # (numbered recordings are dated from 2025-06 on, 10 s apart: still in the past)
    for day in range(1, options.compressed_days + 1):
        say(f"retention: day {day} of {options.compressed_days} (window {options.retention_days} days)")
        send_and_wait(stacks, fleet_uploads(options, stacks, options.recordings_per_day, first), 300)
        first += 100_000
        time.sleep(2)  # the last task-run states
        for statement in AGE_ONE_DAY:
            central.query(statement)
        wait_for_vacuum(central, options.retention_days)
        days.append({"day": day, **central.history()})
    return {"retention_days": options.retention_days, "days": days}


def wait_for_vacuum(central: CentralPrefect, retention_days: int, timeout_s: float = 60) -> None:
    """Until no finished run is older than the window (the vacuum runs every 2 s here)."""
    stale = (
        f"SELECT count(*) FROM flow_run WHERE state_type IN {TERMINAL} AND parent_task_run_id IS NULL"
        f" AND end_time < now() - interval '{retention_days} days'"
    )
    deadline = time.monotonic() + timeout_s
    while central.query(stale)[0][0]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"Prefect's vacuum left runs older than {retention_days} days after {timeout_s:.0f} s")
        time.sleep(1)
    time.sleep(3)  # the orphans' pass after the runs' (logs and artifacts go with their runs)


@contextmanager
def running_fleet(options: FleetOptions, say: Callable[[str], None], keep: bool = False):
    """The central side and the stations in a temporary folder; everything stopped and removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="birdflow-fleet-"))
    root.chmod(0o755)  # Postgres runs as its own user when we are root
    try:
        with ExitStack() as resources:
            yield (*start_fleet(options, root, resources, say), root)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def run_fleet_bench(options: FleetOptions, say: Callable[[str], None]) -> dict:
    with running_fleet(options, say) as (central, stacks, root):
        results: dict = {
            "cores": os.cpu_count(),
            "stations": len(stacks),
            "api_processes": options.api_processes,
            "own_history": options.own_history,
            "drain": drain_phase(options, central, stacks, say),
            "rate": rate_phase(options, central, stacks, say),
        }
        if options.own_history:  # the stations' runs are on their own servers: nothing of theirs to view centrally
            if options.simulated:
                sim = options.simulated
                results["simulated"] = simulated = simulate(sim, central, root / "simulated", say)
                metrics = {}
                if sim.metrics_s:
                    text = httpx.get(f"{stacks[0].url}/metrics", timeout=10).text
                    metrics = remote_write(sim, text, stacks[0].station_id, root / "metrics", say)
                results["simulated_metrics"] = metrics
                results["projection"] = fleet_projection(
                    simulated, metrics, sim.listeners, sim.recording_s, stations=options.fleet_stations
                )
            return results
        results["stations_view"] = station_view(central, stacks)
        if options.compressed_days:
            results["retention"] = retention_phase(options, central, stacks, say)
        return results


def fleet_summary_rows(results: dict) -> list[tuple[str, str]]:
    drain, rate = results["drain"], results["rate"]
    roles = ", ".join(f"{role} {value:.3f}" for role, value in drain["central_cpu_s_per_recording_by_role"].items())
    rows = [
        (
            "fleet",
            f"{results['stations']} stations, {results['api_processes']} Prefect API process(es), "
            f"{results['cores']} cores shared by all; "
            + (
                "each station's run history on its own Prefect (central_api_url)"
                if results["own_history"]
                else "every run on the central Prefect"
            ),
        ),
        (
            "drain",
            f"{drain['recordings']} recordings in {drain['wall_s']:.1f} s: {drain['runs_per_s']:.2f} runs/s; "
            f"latency p95 {drain['latency_p95_s']:.1f} s",
        ),
        (
            "central CPU per recording",
            f"{drain['central_cpu_s_per_recording']:.3f} s ({roles}); "
            f"{drain['central_cores_busy']:.2f} cores busy during the drain, per API process "
            + ", ".join(f"{busy:.2f}" for busy in drain["cores_busy_per_api_process"]),
        ),
        ("station CPU per recording", f"{drain['station_cpu_s_per_recording']:.3f} s"),
        (
            "database growth per run",
            f"{drain['database_bytes_per_run'] / 1024:.1f} KB; rows: "
            + ", ".join(f"{table} {count:.1f}" for table, count in drain["rows_per_run"].items()),
        ),
    ]
    rows += [
        (
            f"rate {step['offered_runs_per_s']:.1f} runs/s",
            f"achieved {step['achieved_runs_per_s']:.2f}, "
            f"p50 {step['latency_p50_s']:.2f} s, p95 {step['latency_p95_s']:.2f} s, central "
            f"{step['central_cores_busy']:.2f} cores",
        )
        for step in rate["steps"]
    ]
    rows.append(
        (
            "sustained",
            f"{rate['sustained_runs_per_s']:.2f} runs/s with latency p95 under the limit"
            + ("" if rate["limit_reached"] else " (the limit was not reached: raise --max-rate)"),
        )
    )
    rows += [
        (
            f"station {view['station']}",
            f"{view['completed_runs']} runs in pool {view['work_pool']} "
            f"(seen through each API process: {view['runs_seen_through_each_api_process']}); "
            f"deployments {', '.join(view['deployments'])}; runs in other pools {view['runs_in_other_pools']}",
        )
        for view in results.get("stations_view", [])
    ]
    if "projection" in results:
        rows += projection_rows(results["projection"], results["simulated"], results["simulated_metrics"])
    for day in results.get("retention", {}).get("days", []):
        rows.append(
            (
                f"retention day {day['day']}",
                f"flow runs {day['flow_run']}, task runs {day['task_run']}, "
                f"logs {day['log']}, events {day['events']}, database {day['database_bytes'] / 1e6:.1f} MB",
            )
        )
    return rows


MODE_NAMES = {"central": "every run central", "own": "each station's own history"}


def modes_side_by_side(by_mode: dict[str, dict]) -> list[tuple[str, str]]:
    """What the central side and the stations pay per recording in each mode (`central`, `own`), one row per
    measure, the modes side by side; then each mode's own rows."""

    def line(measure) -> str:
        return " | ".join(f"{MODE_NAMES[mode]}: {measure(results)}" for mode, results in by_mode.items())

    rows = [
        ("central CPU per recording", line(lambda r: f"{r['drain']['central_cpu_s_per_recording']:.3f} s")),
        (
            "central database per recording",
            line(
                lambda r: (
                    f"{r['drain']['database_bytes_per_run'] / 1024:.1f} KB, "
                    f"{sum(r['drain']['rows_per_run'].values()):.1f} rows"
                )
            ),
        ),
        ("station CPU per recording", line(lambda r: f"{r['drain']['station_cpu_s_per_recording']:.3f} s")),
        ("drain", line(lambda r: f"{r['drain']['runs_per_s']:.2f} runs/s")),
        ("sustained", line(lambda r: f"{r['rate']['sustained_runs_per_s']:.2f} runs/s")),
    ]
    for mode, results in by_mode.items():
        rows += [(f"{MODE_NAMES[mode]}: {name}", value) for name, value in fleet_summary_rows(results)]
    return rows
