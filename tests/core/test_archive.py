"""Both archive backends: verified storage, no second upload of the same content, nothing kept that does not
match the recording's SHA-256. S3 runs against SeaweedFS."""

from __future__ import annotations

import hashlib

import pytest
from boto3.exceptions import S3UploadFailedError

from birdflow.core.archive import ArchiveError, LocalArchive, S3Archive

KEY = "st1/mic1/2025/06/01/mic1_20250601T053000Z_e70acbef.wav"


@pytest.fixture
def recording(tmp_path, sample_48k):
    path = tmp_path / "recording.wav"
    path.write_bytes(sample_48k.read_bytes())
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def s3_archive(seaweed):
    seaweed.create_bucket("archive-test")
    return S3Archive(seaweed.client(), "archive-test", "raw/"), seaweed.client()


def test_s3_stores_verified_once_and_reads_back(s3_archive, recording):
    archive, s3 = s3_archive
    path, sha256 = recording
    first = archive.store(path, KEY, sha256)
    assert first.uploaded and first.uri == f"s3://archive-test/raw/{KEY}" and first.size_bytes == path.stat().st_size
    stored = s3.get_object(Bucket="archive-test", Key=f"raw/{KEY}", ChecksumMode="ENABLED")
    assert stored["Body"].read() == path.read_bytes()
    assert stored["Metadata"]["sha256"] == sha256 and stored["ChecksumSHA256"]
    assert not archive.store(path, KEY, sha256).uploaded  # the same content is never uploaded twice
    assert archive.fetch(KEY) == path.read_bytes()


def test_s3_refuses_bytes_that_do_not_match_the_recording_hash(s3_archive, recording):
    archive, s3 = s3_archive
    path, sha256 = recording
    other = hashlib.sha256(b"what the recording was when it was closed").hexdigest()
    with pytest.raises(S3UploadFailedError, match="BadDigest"):  # the store checked the bytes against the hash
        archive.store(path, "st1/mic1/2025/06/01/changed.wav", other)
    assert s3.list_objects_v2(Bucket="archive-test", Prefix="raw/st1/mic1/2025/06/01/changed").get("KeyCount") == 0


def test_local_archive_verifies_copies_and_stays_inside_its_folder(tmp_path, recording):
    archive = LocalArchive(tmp_path / "archive")
    path, sha256 = recording
    first = archive.store(path, KEY, sha256)
    assert first.uploaded and (tmp_path / "archive" / KEY).read_bytes() == path.read_bytes()
    assert not archive.store(path, KEY, sha256).uploaded
    with pytest.raises(ArchiveError, match="does not match"):
        archive.store(path, "st1/changed.wav", hashlib.sha256(b"other").hexdigest())
    assert not list((tmp_path / "archive" / "st1").glob("changed*"))
    with pytest.raises(ArchiveError, match="leaves the archive folder"):
        archive.store(path, "../outside.wav", sha256)
    assert not (tmp_path / "outside.wav").exists()


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_an_object_can_be_named_and_deleted(backend, s3_archive, tmp_path, recording):
    """What clip retention does: a clip pushed out by a better one is deleted; deleting a missing one is no error."""
    archive = LocalArchive(tmp_path / "archive") if backend == "local" else s3_archive[0]
    path, sha256 = recording
    key = "clips/st1/Spinus_tristis/2025/06/01/r1_3s.flac"
    archive.store(path, key, sha256)
    uri = archive.uri(key)
    assert uri == ((tmp_path / "archive" / key).as_uri() if backend == "local" else f"s3://archive-test/raw/{key}")
    assert archive.fetch(key) == path.read_bytes()
    archive.delete(key)
    assert archive.fetch(key) is None
    archive.delete(key)
