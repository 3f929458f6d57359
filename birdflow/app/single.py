"""One of each per data folder, and no orphans: a second `birdflow up` (or executor) on the same data_dir
refuses to start while the first, or any process it started, still runs; and `up`'s children end when `up`
does, however it ends.

The lock is an flock on a file under data_dir. `up` hands its descriptor to its children, so the kernel
releases the lock only when the last of them has exited: no stale lock file after a crash, and no second
station on the ports and recordings of children that outlived their supervisor.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
from collections.abc import Callable
from pathlib import Path

from birdflow.core.errors import BirdflowError

PR_SET_PDEATHSIG = 1  # linux/prctl.h


class AlreadyRunning(BirdflowError):
    """Another process holds the data folder's lock."""


def hold_lock(path: Path, what: str) -> int:
    """Take the lock at `path` for this process (and the children it hands the descriptor to); returns the
    descriptor, which must stay open. AlreadyRunning names the holder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(descriptor, 32).decode(errors="replace").strip() or "?"
        os.close(descriptor)
        raise AlreadyRunning(
            f"{what} already runs on {path.parent} (process {holder}, or a process it started): stop it first"
        ) from None
    os.ftruncate(descriptor, 0)
    os.write(descriptor, str(os.getpid()).encode())
    return descriptor


def dying_with_this_process() -> Callable[[], None]:
    """A `preexec_fn` for children: they get SIGTERM when the process that started them dies (even by
    SIGKILL), so none outlives its supervisor. Linux; elsewhere a no-op."""
    parent = os.getpid()

    def in_the_child() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # the parent died before the signal was armed
            os.kill(os.getpid(), signal.SIGTERM)

    return in_the_child
