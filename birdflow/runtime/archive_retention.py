"""The local archive's retention as the settings ask for it; the deleting itself is birdflow.core.retention's."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable

from birdflow.core.disk import MB
from birdflow.core.retention import DAY_S, FLOOR_HEADROOM, GB, Purged, PurgeJournal, prune_local_archive
from birdflow.settings import Settings

log = logging.getLogger("birdflow.retention")


def archive_retention(settings: Settings, worth: Callable[[str], int] = lambda recording_id: 1) -> list[Purged]:
    """The local archive's caps and, at the disk floor, its audio: a copy of S3's always, the only copy only
    when the operator chose it (local_archive_purge_at_floor), recordings without detections first. Every
    deletion is logged and put in the purge journal (announced as Prefect events by maintenance)."""
    floor_bytes = settings.unattended.min_free_disk_mb * MB
    copies = settings.archive.archive_backend == "s3"
    purge_at_floor = copies or settings.unattended.local_archive_purge_at_floor
    purged = prune_local_archive(
        settings.local_archive_dir,
        max_bytes=int(settings.unattended.local_archive_max_gb * GB),
        max_age_s=settings.unattended.local_archive_max_days * DAY_S,
        free_target_bytes=int(floor_bytes * FLOOR_HEADROOM) if purge_at_floor else 0,
        free_bytes=lambda: shutil.disk_usage(settings.data_dir).free,
        floor_reason="floor-copy" if copies else "floor",
        worth=worth,
    )
    for item in purged:
        log.warning("archived audio deleted (%s): %s, %d bytes", item.reason, item.recording_id, item.size)
    PurgeJournal(settings.purge_journal_file).add(purged)
    return purged
