"""The disk budget of what is not audio: derived from the disk, shrinking before the floor, in runs to delete."""

from __future__ import annotations

import sqlite3

from birdflow.core.budget import (
    MB,
    TRIM_ROUNDS,
    HistoryBudget,
    derived_budget_bytes,
    runs_to_delete,
    sqlite_bytes_in_use,
)

GB = 1024 * MB


def test_the_default_budget_is_a_share_of_the_disk_within_bounds():
    assert derived_budget_bytes(32 * GB) == int(32 * GB * 0.05)  # 1.6 GB of a 32 GB card
    assert derived_budget_bytes(64 * MB) == 10 * MB
    assert derived_budget_bytes(2048 * GB) == 20 * GB


def test_runs_go_only_past_the_budget_and_down_to_below_it():
    budget = HistoryBudget(budget_bytes=100 * MB, floor_bytes=500 * MB)
    plenty = 10 * GB
    assert budget.trim_target(90 * MB, 5 * MB, plenty) is None
    # 120 MB of history for 4,800 runs (25 KB each) and 5 MB of state: down to 90 % of the 95 MB left for runs
    target = budget.trim_target(120 * MB, 5 * MB, plenty)
    assert target == int(0.9 * 95 * MB)
    doomed = runs_to_delete(120 * MB, 4800, target)
    per_run = 120 * MB / 4800
    assert 120 * MB - doomed * per_run <= target < 120 * MB - (doomed - 1) * per_run


def test_a_pass_deletes_too_few_rather_than_too_many_and_goes_on_down_to_its_target():
    budget = HistoryBudget(budget_bytes=100 * MB, floor_bytes=500 * MB)
    history, runs = 110 * MB, 4000
    fixed, per_run = 60 * MB, 50 * MB / 4000  # the average (110 MB / 4000) is 2.2 times what a run frees
    target = budget.trim_target(history, 0, 10 * GB)
    assert target is not None
    rounds = []
    while wanted := runs_to_delete(history, runs, target):
        rounds.append(wanted)
        runs -= wanted
        history = int(fixed + runs * per_run)
        assert history >= target - per_run  # never more than a run too many
    assert len(rounds) > 1 and history <= target  # more rounds than one, down to the target
    assert sum(rounds[:TRIM_ROUNDS]) >= 0.95 * sum(rounds)  # a pass's rounds go most of the way


def test_history_gives_way_before_audio_as_the_disk_nears_its_floor():
    budget = HistoryBudget(budget_bytes=1 * GB, floor_bytes=500 * MB)
    assert budget.trim_target(400 * MB, 0, 1200 * MB) is None  # far from the floor, within budget
    near = budget.trim_target(400 * MB, 0, 800 * MB)  # 200 MB short of twice the floor
    assert near is not None and near <= 200 * MB
    full = budget.trim_target(400 * MB, 0, 0)
    assert full == 0 and runs_to_delete(400 * MB, 16000, full) == 16000  # a full disk: all of it, before any audio


def test_bytes_in_use_leave_out_freed_pages(tmp_path):
    path = tmp_path / "history.db"
    with sqlite3.connect(path) as database:
        database.execute("CREATE TABLE run (body BLOB)")
        database.executemany("INSERT INTO run VALUES (?)", [(b"x" * 4000,)] * 500)
    full = sqlite_bytes_in_use(path)
    with sqlite3.connect(path) as database:
        database.execute("DELETE FROM run")
    assert full > 1.9 * MB and sqlite_bytes_in_use(path) < full / 10 and path.stat().st_size >= full
