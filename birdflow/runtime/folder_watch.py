"""Wake up as soon as a file lands in a folder (Linux inotify), instead of waiting for the next poll.

Recordings are renamed into the recordings folder when they close, so IN_MOVED_TO (and IN_CLOSE_WRITE
for files copied in by hand) is the signal. Where inotify is not available this degrades to a sleep.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import struct
import time
from pathlib import Path

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, length of the name that follows


class FolderWatch:
    def __init__(self, folder: Path):
        self.fd = -1
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
            if fd >= 0 and libc.inotify_add_watch(fd, os.fsencode(folder), IN_MOVED_TO | IN_CLOSE_WRITE) >= 0:
                self.fd = fd
            elif fd >= 0:
                os.close(fd)
        except (OSError, AttributeError):
            pass  # not Linux: callers poll

    def landed(self, timeout_s: float) -> list[str]:
        """Names of the files that landed since the last call, waiting up to `timeout_s` for one."""
        if self.fd < 0:
            time.sleep(timeout_s)
            return []
        ready, _, _ = select.select([self.fd], [], [], timeout_s)
        if not ready:
            return []
        data = b""
        try:
            while chunk := os.read(self.fd, 65536):
                data += chunk
        except BlockingIOError:
            pass
        names, offset = [], 0
        while offset + _EVENT.size <= len(data):
            _, _, _, length = _EVENT.unpack_from(data, offset)
            offset += _EVENT.size
            names.append(data[offset : offset + length].rstrip(b"\0").decode(errors="replace"))
            offset += length
        return names

    def wait(self, timeout_s: float) -> bool:
        """Block until something landed in the folder or the timeout passed; True if something did."""
        return bool(self.landed(timeout_s))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
