"""The local archive's retention as the settings ask for it: at the disk floor the only copies stay unless the
operator chose otherwise, copies of what S3 holds may go; every deletion journalled."""

from __future__ import annotations

import shutil

from birdflow.core.retention import PurgeJournal
from birdflow.runtime.archive_retention import archive_retention
from birdflow.settings import Settings
from tests.builders import archived

DAY = 86400


def test_at_the_floor_the_only_copies_stay_unless_the_operator_chose_otherwise(tmp_path, monkeypatch):
    root = tmp_path / "data" / "archive"
    heard = archived(root, "2025/06/01", "mic1_20250601T050000Z_aaaaaaaa.flac", 100, 3 * DAY)
    quiet = archived(root, "2025/06/02", "mic1_20250602T050000Z_bbbbbbbb.flac", 100, 2 * DAY)
    best_clip = root / "clips" / "st" / "Spinus tristis" / "best.flac"
    best_clip.parent.mkdir(parents=True)
    best_clip.write_bytes(b"\0" * 100)
    monkeypatch.setattr(
        "birdflow.runtime.archive_retention.shutil.disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0)
    )
    worth = {"mic1_20250601T050000Z_aaaaaaaa": 2, "mic1_20250602T050000Z_bbbbbbbb": 0}.get
    defaults = Settings(data_dir=tmp_path / "data")
    assert archive_retention(defaults, worth) == [] and heard.exists() and quiet.exists()  # refused with 507 instead
    chosen = Settings(data_dir=tmp_path / "data", local_archive_purge_at_floor=True)
    purged = archive_retention(chosen, worth)
    # the recording without detections went first although it is the newer; never a clip
    assert [(item.recording_id, item.reason) for item in purged] == [
        ("mic1_20250602T050000Z_bbbbbbbb", "floor"),
        ("mic1_20250601T050000Z_aaaaaaaa", "floor"),
    ]
    assert best_clip.exists()
    journal = PurgeJournal(chosen.purge_journal_file)
    assert [item.recording_id for item in journal.take()] == [item.recording_id for item in purged]
    journal.taken()
    assert journal.take() == []


def test_at_the_floor_copies_of_what_s3_holds_may_go(tmp_path, monkeypatch):
    root = tmp_path / "data" / "archive"
    copy = archived(root, "2025/06/01", "mic1_20250601T050000Z_aaaaaaaa.flac", 100, DAY)
    monkeypatch.setattr(
        "birdflow.runtime.archive_retention.shutil.disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0)
    )
    s3 = Settings(data_dir=tmp_path / "data", archive_backend="s3", s3_bucket="b", keep_local_recordings=True)
    assert [item.reason for item in archive_retention(s3)] == ["floor-copy"] and not copy.exists()
