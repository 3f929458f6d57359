"""Partial files left behind by a crash (kill -9, power cut) or by a close that could not finish (full disk).

A stream's partial carries its listener and start time in its name and its format in the WAV header at
its first bytes, so whatever audio reached the disk is published as a recording of its own (sizes patched,
a torn last sample cut off). An interrupted upload was never answered, so its client sends it again: it
is removed. No HTTP in here.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from birdflow.core.recordings import RecordingInfo, RecordingStore, parse_stream_partial
from birdflow.core.wav import WavError, parse_header, patch_sizes

MAX_HEADER_BYTES = 1 << 16


@dataclass
class Recovery:
    published: list[RecordingInfo] = field(default_factory=list)
    removed: Counter = field(default_factory=Counter)  # reason -> files


def recover_partials(
    store: RecordingStore,
    min_duration_s: float,
    untouched_for_s: float | None = None,
    in_use: Collection[Path] = (),
) -> Recovery:
    """Publish or remove every partial file except those `in_use` and, when `untouched_for_s` is given,
    those written to more recently (a live process may be closing them)."""
    outcome = Recovery()
    newest_allowed = time.time() - untouched_for_s if untouched_for_s is not None else float("inf")
    for path in sorted(store.partial_dir.iterdir()):
        try:
            if not path.is_file() or path in in_use or path.stat().st_mtime > newest_allowed:
                continue
        except FileNotFoundError:
            continue
        stream = parse_stream_partial(path.name)
        if stream is None:
            # an upload cut off before its answer, or a sidecar whose recording was not published
            reason = "interrupted_upload" if path.name.startswith("upload_") else "stray_file"
            path.unlink(missing_ok=True)
            outcome.removed[reason] += 1
            continue
        listener_id, start_time = stream
        info, reason = _publish_stream_partial(store, path, listener_id, start_time, min_duration_s)
        if info is not None:
            outcome.published.append(info)
        else:
            path.unlink(missing_ok=True)
            outcome.removed[reason] += 1
    return outcome


def _publish_stream_partial(store, path: Path, listener_id: str, start_time, min_duration_s: float):
    """(RecordingInfo, "") when published, else (None, why it was not)."""
    with open(path, "r+b") as file:
        try:
            header = parse_header(file.read(MAX_HEADER_BYTES))
        except WavError:
            return None, "partial_unreadable"
        wav_format = header.format
        size = os.fstat(file.fileno()).st_size
        data_bytes = max(0, size - header.size) // wav_format.block_align * wav_format.block_align
        duration_s = data_bytes / wav_format.byte_rate
        if duration_s < min_duration_s:
            return None, "partial_too_short"
        file.truncate(header.size + data_bytes)
        patch_sizes(file, header.size, data_bytes)
        file.flush()
        os.fsync(file.fileno())
    info = store.publish(
        path,
        listener_id=listener_id,
        start_time=start_time,
        duration_s=duration_s,
        sample_rate=wav_format.sample_rate,
        channels=wav_format.channels,
        gaps=0,
        source="recovered",
    )
    return info, ""
