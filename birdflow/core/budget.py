"""The disk budget of what a station keeps that is not audio: its run history (the Prefect database) and its
state (cached results, the processed record, species counts). Bounded by bytes, not by days: a run costs
~25 KB of database, so 30 listeners at full duty (130,000 runs a day) would fill a 32 GB card in a week
under a 14-day retention. Past the budget, or when the disk nears its floor, the oldest run history goes
first, so that audio is refused (507) only when nothing else can be freed. No Prefect here.
"""

from __future__ import annotations

import math
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

MB = 1 << 20
BUDGET_SHARE_OF_DISK = 0.05  # 1.6 GB of a 32 GB card
SMALLEST_BUDGET = 10 * MB
LARGEST_BUDGET = 20 * 1024 * MB
SHRINK_TO = 0.9  # once over, down to 90 % of what is allowed, so that not every pass deletes a little
# rounds of deletion a pass may take to reach that: 97 % of the way with a database 55 % fixed (a small budget)
TRIM_ROUNDS = 8
FLOOR_MARGIN = 2.0  # history gives way before audio: it shrinks once free space is below twice the floor
# the processed record's share of the budget (~100 bytes a recording: 4 million recordings of 1.6 GB)
RECORD_SHARE = 0.25


def derived_budget_bytes(disk_total_bytes: int) -> int:
    """The default budget: 5 % of the data disk, at least 10 MB, at most 20 GB."""
    return int(min(LARGEST_BUDGET, max(SMALLEST_BUDGET, disk_total_bytes * BUDGET_SHARE_OF_DISK)))


def sqlite_bytes_in_use(path: Path) -> int:
    """Bytes of the pages an SQLite database uses: not the pages it freed (it reuses them), nor its write-ahead
    log, which is transient and bounded (checkpointed back into the pages) and which deleting rows only grows."""
    if not Path(path).exists():
        return 0
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as database:
        pages, free, size = (
            database.execute(f"PRAGMA {name}").fetchone()[0] for name in ("page_count", "freelist_count", "page_size")
        )
    return (pages - free) * size


@dataclass(frozen=True)
class HistoryBudget:
    budget_bytes: int
    floor_bytes: int

    def allowed_bytes(self, history_bytes: int, free_bytes: int) -> int:
        """What the run history may hold now: the budget, and less while the disk is near its floor."""
        shortfall = max(0, int(FLOOR_MARGIN * self.floor_bytes) - free_bytes)
        return max(0, min(self.budget_bytes, history_bytes - shortfall))

    def trim_target(self, history_bytes: int, state_bytes: int, free_bytes: int) -> int | None:
        """What the run history must shrink to once it does not fit: SHRINK_TO of what it may hold beside the
        state (which shares the budget but is not freed by deleting runs); None while everything fits."""
        allowed = self.allowed_bytes(history_bytes + state_bytes, free_bytes) - state_bytes
        return None if history_bytes <= allowed else int(SHRINK_TO * max(0, allowed))


def runs_to_delete(history_bytes: int, runs: int, target_bytes: int) -> int:
    """How many of the oldest runs to delete to bring the history down to `target_bytes`, a run taken to free the
    history's average per run. That counts the database's fixed part too, so too few go, never too many: the
    caller measures again and deletes more."""
    if history_bytes <= target_bytes or runs <= 0:
        return 0
    return min(runs, math.ceil((history_bytes - target_bytes) / (history_bytes / runs)))
