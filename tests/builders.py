"""Objects the tests build often, with defaults that make a valid one and keywords for what a test cares about."""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta, timezone

from birdflow.core.birdnet import Detection
from birdflow.core.detections import detections_table
from birdflow.core.recordings import TIMESTAMP_FORMAT, RecordingInfo

JUNE_MORNING = datetime(2025, 6, 1, 5, 30, tzinfo=timezone.utc)


def recording_info(
    listener_id: str = "mic1", start_time: datetime = JUNE_MORNING, content_hash: str = "ab" * 32, **overrides
) -> RecordingInfo:
    """A recording as the ingest API would have published it (its id from listener, start and hash)."""
    recording_id = overrides.pop("recording_id", f"{listener_id}_{start_time:{TIMESTAMP_FORMAT}}_{content_hash[:8]}")
    values = dict(
        recording_id=recording_id,
        listener_id=listener_id,
        station_id="station01",
        start_time=start_time,
        duration_s=10.0,
        sample_rate=48000,
        content_hash=content_hash,
        size_bytes=960044,
        file_name=f"{recording_id}.wav",
    )
    return RecordingInfo(**{**values, **overrides})


ROBIN = ("Turdus migratorius", "American Robin")
HAWK = ("Accipiter cooperii", "Cooper's Hawk")


def two_listeners_detections():
    """Two listeners, three recordings, one of them an hour later; a name with an apostrophe."""
    import pyarrow as pa

    tables = [
        detections_table(
            recording_info("mic1"),
            [Detection(0.0, 3.0, *ROBIN, 0.91), Detection(3.0, 6.0, *ROBIN, 0.62), Detection(6.0, 9.0, *HAWK, 0.4)],
            "BirdNET_GLOBAL_6K_V2.4",
            "a1",
        ),
        detections_table(recording_info("mic2"), [Detection(1.5, 4.5, *HAWK, 0.77)], "BirdNET_GLOBAL_6K_V2.4", "a1"),
        detections_table(
            recording_info("mic1", start_time=JUNE_MORNING + timedelta(hours=1), content_hash="cd" * 32),
            [Detection(0.0, 3.0, *ROBIN, 0.55)],
            "BirdNET_GLOBAL_6K_V2.4",
            "a1",
        ),
    ]
    return pa.concat_tables(tables)


def archived(root, day: str, name: str, size: int, age_s: float):
    """An archived recording of `size` bytes under a day folder, last modified `age_s` ago."""
    path = root / "st" / "mic1" / day / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size)
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path
