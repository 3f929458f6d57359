"""What keeps storage from growing: local archive pruning, stale temporary files, cached results,
the hourly compaction of the detections, and the processed-recordings record."""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta, timezone

import pytest

from birdflow.core.birdnet import Detection
from birdflow.core.budget import sqlite_bytes_in_use
from birdflow.core.detections import detections_table
from birdflow.core.ledger import ProcessedLedger
from birdflow.core.results import ResultsDatabase
from birdflow.core.retention import prune_local_archive, remove_stale_files
from birdflow.core.sinks import ParquetSink, compact_detections, read_detections
from birdflow.settings import Settings
from tests.builders import archived, recording_info

DAY = 86400


@pytest.fixture
def archive(tmp_path):
    root = tmp_path / "archive"
    files = [
        archived(root, "2025/06/01", "a.flac", 100, 3 * DAY),
        archived(root, "2025/06/02", "b.flac", 100, 2 * DAY),
        archived(root, "2025/06/03", "c.flac", 100, 1 * DAY),
    ]
    return root, files


def test_the_archive_cap_deletes_the_oldest_recording_days_first(archive):
    root, (oldest, middle, newest) = archive
    freed = prune_local_archive(root, max_bytes=150)
    assert [(item.recording_id, item.size, item.reason) for item in freed] == [("a", 100, "size"), ("b", 100, "size")]
    assert not oldest.exists() and not middle.exists() and newest.exists()
    assert not (root / "st" / "mic1" / "2025" / "06" / "01").exists()  # emptied folders go too


def test_the_age_limit_and_the_disk_floor(archive):
    root, (oldest, middle, newest) = archive
    assert [item.reason for item in prune_local_archive(root, max_age_s=2.5 * DAY)] == ["age"] and not oldest.exists()
    free = iter([0, 0, 10**9])  # the disk is full until one more file went
    assert len(prune_local_archive(root, free_target_bytes=10**6, free_bytes=lambda: next(free))) == 2
    assert not middle.exists() and not newest.exists()


def test_nothing_is_deleted_without_a_rule(archive):
    root, files = archive
    assert prune_local_archive(root) == [] and all(path.exists() for path in files)


def test_stale_temporary_files_go_and_fresh_ones_stay(tmp_path):
    stale, fresh, kept = tmp_path / "x.flac.partial", tmp_path / "y.partial", tmp_path / "z.flac"
    for path in (stale, fresh, kept):
        path.write_bytes(b"1234")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert remove_stale_files([tmp_path, tmp_path / "missing"], older_than_s=3600).files == 1
    assert not stale.exists() and fresh.exists() and kept.exists()
    os.utime(kept, (time.time() - 7200, time.time() - 7200))
    assert remove_stale_files([tmp_path], older_than_s=3600, pattern="*").files == 1 and not kept.exists()


def test_cached_results_older_than_the_retention_are_pruned(tmp_path):
    results = ResultsDatabase(tmp_path / "results.sqlite")
    results.write("old", b"a")
    results.write("new", b"b")
    results.database.execute("UPDATE results SET written_at = written_at - ? WHERE key = 'old'", (20 * DAY,))
    assert results.prune(14 * DAY) == 1
    assert results.read("new") == b"b"
    with pytest.raises(KeyError):
        results.read("old")


def test_the_ledger_answers_per_recording_and_analysis(tmp_path):
    ledger = ProcessedLedger(tmp_path / "processed.sqlite")
    ledger.record("mic1_20250601T053000Z_abcdef12", "a1")
    ledger.record("mic1_20250601T053000Z_abcdef12", "a1")  # a rerun records it again, once
    again = ProcessedLedger(tmp_path / "processed.sqlite")  # what a restarted process sees
    assert again.contains("mic1_20250601T053000Z_abcdef12", "a1")
    assert not again.contains("mic1_20250601T053000Z_abcdef12", "b2")
    assert again.recording_ids() == {"mic1_20250601T053000Z_abcdef12"}


def table(recording_id: str, start: datetime, *confidences: float, analysis_id: str = "a1"):
    info = recording_info(recording_id=recording_id, start_time=start)
    found = [
        Detection(3.0 * n, 3.0 * n + 3, "Spinus tristis", "American Goldfinch", c) for n, c in enumerate(confidences)
    ]
    return detections_table(info, found, "BirdNET_GLOBAL_6K_V2.4", analysis_id)


def test_compaction_merges_settled_files_into_hour_files_and_a_rewrite_replaces_its_rows(tmp_path):
    sink = ParquetSink(tmp_path, tmp_path / "hourly", tmp_path / "health", tmp_path / "reviews")
    six, seven = datetime(2025, 6, 1, 6, 10, tzinfo=timezone.utc), datetime(2025, 6, 1, 7, 5, tzinfo=timezone.utc)
    sink.write(table("r1", six, 0.5, 0.6))
    sink.write(table("r2", six + timedelta(minutes=1), 0.7))
    sink.write(table("r3", seven, 0.8))
    before = read_detections(tmp_path)
    assert compact_detections(tmp_path, settled_s=3600).files_merged == 0  # too fresh: a run may rewrite them
    outcome = compact_detections(tmp_path, settled_s=0)
    assert (outcome.files_merged, outcome.hour_files_written) == (3, 2)
    assert sorted(path.name for path in tmp_path.rglob("*.parquet")) == ["hour-06.parquet", "hour-07.parquet"]
    assert read_detections(tmp_path).equals(before)
    # a rerun of r1 with other results: its rows replace the compacted ones, before and after compaction
    sink.write(table("r1", six, 0.9))
    assert sorted(read_detections(tmp_path).column("confidence").to_pylist()) == [0.7, 0.8, 0.9]
    compact_detections(tmp_path, settled_s=0)
    assert sorted(read_detections(tmp_path).column("confidence").to_pylist()) == [0.7, 0.8, 0.9]
    # another analysis of r1 stands beside the first
    sink.write(table("r1", six, 0.4, analysis_id="b2"))
    compact_detections(tmp_path, settled_s=0)
    assert read_detections(tmp_path).num_rows == 4


def test_prefect_deletes_runs_past_the_retention_with_their_task_runs_and_logs(tmp_path):
    """The embedded server's retention is Prefect's own db_vacuum, configured by birdflow's settings."""
    import sqlite3

    import httpx

    from birdflow.app.prefect_env import prefect_environment
    from birdflow_tools.testbed import prefect_post, wait_until
    from tests.servers import PrefectServer

    vacuum = {
        key: value
        for key, value in prefect_environment(Settings(data_dir=tmp_path / "data", run_retention_days=14)).items()
        if "DB_VACUUM" in key
    }
    assert vacuum == {
        "PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED": "events,flow_runs",
        "PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD": str(14 * DAY),
    }
    server = PrefectServer(
        tmp_path / "prefect", extra_env={**vacuum, "PREFECT_SERVER_SERVICES_DB_VACUUM_LOOP_SECONDS": "1"}
    )
    server.start(tmp_path / "server.log")
    api = server.api_url
    try:
        flow = prefect_post(api, "flows/", {"name": "retention-test"})
        runs = [prefect_post(api, "flow_runs/", {"flow_id": flow["id"], "name": f"run-{n}"}) for n in range(2)]
        for run in runs:
            for state in ("RUNNING", "COMPLETED"):
                prefect_post(api, f"flow_runs/{run['id']}/set_state", {"state": {"type": state}, "force": True})
            log = {
                "name": "t",
                "level": 20,
                "message": "m",
                "timestamp": "2025-01-01T00:00:00Z",
                "flow_run_id": run["id"],
            }
            prefect_post(api, "logs/", [log])
        old, recent = runs
        with sqlite3.connect(tmp_path / "prefect" / "prefect.db") as database:  # as if it had ended 20 days ago
            database.execute("UPDATE flow_run SET end_time = datetime('now', '-20 days') WHERE id = ?", (old["id"],))

        def gone() -> bool:
            return httpx.get(f"{api}/flow_runs/{old['id']}").status_code == 404

        wait_until(gone, 60, "the old run deleted by the vacuum")
        logs = prefect_post(api, "logs/filter", {"logs": {"flow_run_id": {"any_": [old["id"], recent["id"]]}}})
        assert {log["flow_run_id"] for log in logs} == {recent["id"]}
        assert httpx.get(f"{api}/flow_runs/{recent['id']}").status_code == 200
    finally:
        server.stop()


def test_the_processed_record_forgets_its_oldest_past_its_share(tmp_path):
    ledger = ProcessedLedger(tmp_path / "processed.sqlite")
    for number in range(3000):
        ledger.record(f"mic1_20250601T05{number:04d}Z_{number:08x}", "a1", number % 3)
    used = sqlite_bytes_in_use(tmp_path / "processed.sqlite")
    assert ledger.keep_within(used) == 0
    forgotten = ledger.keep_within(used // 2)
    assert 1200 < forgotten < 2000
    assert not ledger.contains("mic1_20250601T050000Z_00000000", "a1")  # the oldest went
    assert ledger.contains("mic1_20250601T052999Z_00000bb7", "a1")
    assert ledger.detections("mic1_20250601T052999Z_00000bb7") == 2999 % 3
