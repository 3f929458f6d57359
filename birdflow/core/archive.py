"""Where raw recordings go to be kept: a local folder, or an S3 bucket (a boto3 client, the bucket's name, a folder).

Both verify what they stored (size and SHA-256) and never store the same content twice.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from birdflow.core.errors import BirdflowError
from birdflow.core.flac import flac_identity
from birdflow.core.recordings import sha256_file


class ArchiveError(BirdflowError):
    """The archived copy does not match the recording."""


def holds_recording(data: bytes, content_hash: str) -> bool:
    """Whether archived bytes are the recording: the file itself, or a FLAC copy made from it."""
    return hashlib.sha256(data).hexdigest() == content_hash or flac_identity(data) == content_hash


@dataclass(frozen=True)
class ArchivedObject:
    uri: str
    size_bytes: int
    uploaded: bool  # False when an identical copy was already there


class Archive(Protocol):
    def store(self, path: Path, key: str, sha256: str) -> ArchivedObject: ...

    def fetch(self, key: str) -> bytes | None:
        """The stored object, None when there is none (a store that cannot be reached raises)."""

    def delete(self, key: str) -> None:
        """Remove the object (nothing when there is none)."""

    def uri(self, key: str) -> str:
        """Where the object is, for people (file:// or s3://)."""

    def browser_link(self, key: str, valid_s: int) -> str | None:
        """A link a browser opens without credentials for `valid_s` seconds; None where the store has none."""


class LocalArchive:
    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        target = (self.root / key).resolve()
        if not target.is_relative_to(self.root.resolve()):
            raise ArchiveError(f"archive key {key!r} leaves the archive folder")
        return target

    def store(self, path: Path, key: str, sha256: str) -> ArchivedObject:
        target = self._path(key)
        size = path.stat().st_size
        if target.is_file() and target.stat().st_size == size and sha256_file(target) == sha256:
            return ArchivedObject(target.as_uri(), size, uploaded=False)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        with open(path, "rb") as source, open(partial, "wb") as copy:
            shutil.copyfileobj(source, copy, 1 << 20)
            copy.flush()
            os.fsync(copy.fileno())
        if sha256_file(partial) != sha256:
            partial.unlink(missing_ok=True)
            raise ArchiveError(f"archived copy of {key} does not match its SHA-256")
        os.replace(partial, target)
        return ArchivedObject(target.as_uri(), size, uploaded=True)

    def fetch(self, key: str) -> bytes | None:
        path = self._path(key)
        return path.read_bytes() if path.is_file() else None

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def browser_link(self, key: str, valid_s: int) -> str | None:
        return None  # a browser is refused file:// links; the station serves its clips (ingest API, /clips)


# One PUT can carry the object's SHA-256 for the store to check; a multipart upload cannot (S3 takes a
# full-object SHA-256 only on a single PUT, which may be up to 5 GiB).
SINGLE_PUT_LIMIT_BYTES = 5 << 30
PRESIGNED_MAX_S = 7 * 86400  # the longest a Signature V4 link may be valid


class S3Archive:
    """Each object is sent in one PUT with its SHA-256, which the store checks against the bytes it
    received (BadDigest otherwise), and keeps it as user metadata, which is how duplicates are recognised."""

    def __init__(self, client, bucket_name: str, folder: str = ""):
        """`client`: a boto3 S3 client; `folder`: the prefix every key is stored under."""
        from boto3.s3.transfer import TransferConfig

        self.bucket_name = bucket_name
        self.folder = folder.strip("/")
        self._client = client
        self._single_put = TransferConfig(multipart_threshold=SINGLE_PUT_LIMIT_BYTES)

    def _key(self, key: str) -> str:
        return f"{self.folder}/{key}" if self.folder else key

    def _head(self, key: str):
        try:
            return self._client.head_object(Bucket=self.bucket_name, Key=self._key(key), ChecksumMode="ENABLED")
        except self._client.exceptions.ClientError as exc:
            if _missing(exc):
                return None
            raise

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket_name}/{self._key(key)}"

    def browser_link(self, key: str, valid_s: int) -> str | None:
        """A presigned GET (Signature V4: at most 7 days)."""
        return self._client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket_name, "Key": self._key(key)},
            ExpiresIn=min(valid_s, PRESIGNED_MAX_S),
        )

    def store(self, path: Path, key: str, sha256: str) -> ArchivedObject:
        size = path.stat().st_size
        uri = self.uri(key)
        head = self._head(key)
        if head and head["ContentLength"] == size and head.get("Metadata", {}).get("sha256") == sha256:
            return ArchivedObject(uri, size, uploaded=False)
        if size > SINGLE_PUT_LIMIT_BYTES:
            raise ArchiveError(f"{path.name} is {size} bytes, over the {SINGLE_PUT_LIMIT_BYTES} bytes of one S3 PUT")
        checksum = base64.b64encode(bytes.fromhex(sha256)).decode()
        self._client.upload_file(
            str(path),
            self.bucket_name,
            self._key(key),
            ExtraArgs={"Metadata": {"sha256": sha256}, "ChecksumSHA256": checksum},
            Config=self._single_put,
        )
        head = self._head(key)
        if (
            head is None
            or head["ContentLength"] != size
            or head.get("Metadata", {}).get("sha256") != sha256
            or head.get("ChecksumSHA256", checksum) != checksum  # a store without checksums returns none
        ):
            raise ArchiveError(f"{uri} does not match the recording after upload")
        return ArchivedObject(uri, size, uploaded=True)

    def fetch(self, key: str) -> bytes | None:
        try:
            return self._client.get_object(Bucket=self.bucket_name, Key=self._key(key))["Body"].read()
        except self._client.exceptions.ClientError as exc:
            if _missing(exc):
                return None
            raise

    def delete(self, key: str) -> None:
        self._client.delete_object(Bucket=self.bucket_name, Key=self._key(key))


def _missing(exc) -> bool:
    return exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")
