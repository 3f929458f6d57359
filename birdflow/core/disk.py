"""The disk floor: below `min_free_disk_mb` the station first frees space by its retention rules, then
refuses new recordings, rather than fill the disk (a full disk truncates whatever is being written and
stops the database). Space that returns is noticed at the next recording: nothing needs a restart.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from birdflow.core.errors import BirdflowError

MB = 1 << 20
log = logging.getLogger(__name__)


class InsufficientStorage(BirdflowError):
    """Free space is below the floor, even after retention."""


class DiskFloor:
    def __init__(self, path: Path, floor_bytes: int, relieve: Callable[[], None], relieve_every_s: float = 30.0):
        """`relieve` frees what retention allows; it runs on a thread of its own, at most every
        `relieve_every_s`, so a request never waits for it."""
        self.path = Path(path)
        self.floor_bytes = floor_bytes
        self.relieve = relieve
        self.relieve_every_s = relieve_every_s
        self._last_relief = -float("inf")
        self._relief: threading.Thread | None = None

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.path).free

    def require_room(self) -> None:
        """Return when free space is at or above the floor; else start a relief and raise InsufficientStorage."""
        if self.floor_bytes <= 0:
            return
        free = self.free_bytes()
        if free >= self.floor_bytes:
            return
        self._start_relief()
        raise InsufficientStorage(
            f"insufficient storage: {free // MB} MB free on the station's disk, below its floor of "
            f"{self.floor_bytes // MB} MB (min_free_disk_mb); try again later"
        )

    def _start_relief(self) -> None:
        now = time.monotonic()
        if (self._relief and self._relief.is_alive()) or now - self._last_relief < self.relieve_every_s:
            return
        self._last_relief = now
        self._relief = threading.Thread(target=self._run_relief, name="disk-relief", daemon=True)
        self._relief.start()

    def _run_relief(self) -> None:
        try:
            self.relieve()
        except Exception:
            log.exception("freeing disk space failed")
