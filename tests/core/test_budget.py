"""The disk budget of what is not audio: derived from the disk, shrinking before the floor, in runs to delete."""

from __future__ import annotations

import sqlite3

from birdflow.core.budget import MB, HistoryBudget, derived_budget_bytes, sqlite_bytes_in_use

GB = 1024 * MB


def test_the_default_budget_is_a_share_of_the_disk_within_bounds():
    assert derived_budget_bytes(32 * GB) == int(32 * GB * 0.05)  # 1.6 GB of a 32 GB card
    assert derived_budget_bytes(64 * MB) == 10 * MB
    assert derived_budget_bytes(2048 * GB) == 20 * GB


def test_runs_go_only_past_the_budget_and_down_to_below_it():
    budget = HistoryBudget(budget_bytes=100 * MB, floor_bytes=500 * MB)
    plenty = 10 * GB
    assert budget.runs_to_delete(90 * MB, 5 * MB, 4000, plenty) == 0
    # 120 MB of history for 4,800 runs (25 KB each) and 5 MB of state: down to 90 % of the 95 MB left for runs
    doomed = budget.runs_to_delete(120 * MB, 5 * MB, 4800, plenty)
    per_run = 120 * MB / 4800
    assert 120 * MB - doomed * per_run <= 0.9 * 95 * MB < 120 * MB - (doomed - 1) * per_run


def test_history_gives_way_before_audio_as_the_disk_nears_its_floor():
    budget = HistoryBudget(budget_bytes=1 * GB, floor_bytes=500 * MB)
    assert budget.runs_to_delete(400 * MB, 0, 16000, 1200 * MB) == 0  # far from the floor, within budget
    near = budget.runs_to_delete(400 * MB, 0, 16000, 800 * MB)  # 200 MB short of twice the floor
    assert near > 0 and 400 * MB - near * (400 * MB / 16000) <= 200 * MB
    assert budget.runs_to_delete(400 * MB, 0, 16000, 0) == 16000  # a full disk: all of it, before any audio


def test_bytes_in_use_leave_out_freed_pages(tmp_path):
    path = tmp_path / "history.db"
    with sqlite3.connect(path) as database:
        database.execute("CREATE TABLE run (body BLOB)")
        database.executemany("INSERT INTO run VALUES (?)", [(b"x" * 4000,)] * 500)
    full = sqlite_bytes_in_use(path)
    with sqlite3.connect(path) as database:
        database.execute("DELETE FROM run")
    assert full > 1.9 * MB and sqlite_bytes_in_use(path) < full / 10 and path.stat().st_size >= full
