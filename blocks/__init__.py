"""Prefect blocks for the external systems birdflow writes to, registered from the settings.

The settings stay the one source of configuration; `birdflow blocks register` (and `birdflow up`) mirror
them into blocks so the Prefect UI shows, and flow runs on any worker load, the same configuration.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, cast

from prefect.blocks.core import Block
from prefect.exceptions import ObjectNotFound
from prefect.filesystems import WritableFileSystem
from pydantic import Field, SecretStr

from birdflow.core.archive import S3Archive
from birdflow.core.results import ResultsDatabase
from birdflow.settings import Settings

if TYPE_CHECKING:  # prefect-aws (and boto3, ~20 MB) is imported only by stations that archive to S3
    from prefect_aws import S3Bucket

INFLUX_BLOCK_NAME = "birdflow-influxdb3"


class InfluxDB3Connection(Block):
    """An InfluxDB 3 database and table that receive detection rows."""

    _block_type_name = "Birdflow InfluxDB3 Connection"
    _description = "Where birdflow writes detections in InfluxDB 3 (host, database, table, token)."

    host: str = Field(..., description="InfluxDB 3 URL, e.g. http://127.0.0.1:8181")
    database: str = Field("birdflow", description="Database that receives the detections")
    table: str = Field("detections", description="Table (measurement) name")
    token: SecretStr = Field(SecretStr(""), description="Token with write access to the database")


class SQLiteResultStorage(WritableFileSystem):
    """Where cached task results live: rows of one SQLite file (birdflow.core.results), not a file each."""

    _block_type_name = "Birdflow SQLite Result Storage"
    _description = "Cached task results of a birdflow station, in one SQLite file."

    path: str = Field(..., description="The SQLite file")

    # synchronous, as Prefect's LocalFileSystem is: the result store calls it with _sync=True
    def read_path(self, path: str, _sync: bool = True) -> bytes:  # type: ignore[override]
        return _results_database(self.path).read(path)

    def write_path(self, path: str, content: bytes, _sync: bool = True) -> None:  # type: ignore[override]
        _results_database(self.path).write(path, content)

    async def aread_path(self, path: str) -> bytes:
        return self.read_path(path)

    async def awrite_path(self, path: str, content: bytes) -> None:
        self.write_path(path, content)


@cache
def _results_database(path: str) -> ResultsDatabase:
    """One per file and process, so each thread keeps its connection across runs."""
    return ResultsDatabase(Path(path))


# An unreachable store fails a request in seconds, not after botocore's own minutes of retries: the task's
# retries and the re-drive of failed runs do the waiting, without holding a flow-run thread.
S3_CLIENT_CONFIG = {"retries": {"max_attempts": 2, "mode": "standard"}, "connect_timeout": 5, "read_timeout": 60}


def s3_bucket_from_settings(settings: Settings) -> S3Bucket:
    from prefect_aws import AwsClientParameters, AwsCredentials, S3Bucket

    client_parameters = AwsClientParameters(
        endpoint_url=settings.archive.s3_endpoint_url or None, config=S3_CLIENT_CONFIG
    )
    credentials = AwsCredentials(
        aws_access_key_id=settings.archive.aws_access_key_id or None,
        aws_secret_access_key=settings.archive.aws_secret_access_key.get_secret_value() or None,
        region_name=settings.archive.s3_region,
        aws_client_parameters=client_parameters,
    )
    return S3Bucket(
        bucket_name=settings.archive.s3_bucket, bucket_folder=settings.archive.s3_prefix, credentials=credentials
    )


def influx_from_settings(settings: Settings) -> InfluxDB3Connection:
    return InfluxDB3Connection(
        host=settings.sinks.influx_host,
        database=settings.sinks.influx_database,
        table=settings.sinks.influx_table,
        token=settings.sinks.influx_token,
    )


def register_blocks(settings: Settings) -> list[str]:
    """Create or update the blocks the settings describe; returns their slugs."""
    saved = []
    if settings.archive.archive_backend == "s3":
        s3_bucket_from_settings(settings).save(settings.archive.s3_block_name, overwrite=True)
        saved.append(f"s3-bucket/{settings.archive.s3_block_name}")
    if settings.sinks.influx_enabled:
        influx_from_settings(settings).save(INFLUX_BLOCK_NAME, overwrite=True)
        saved.append(f"birdflow-influxdb3-connection/{INFLUX_BLOCK_NAME}")
    return saved


def load_s3_bucket(settings: Settings) -> S3Bucket:
    """The registered block (it may have been edited in the UI), else one built from the settings."""
    from prefect_aws import S3Bucket

    try:
        return cast(S3Bucket, S3Bucket.load(settings.archive.s3_block_name))
    except (ObjectNotFound, ValueError):
        return s3_bucket_from_settings(settings)


def archive_in_bucket(bucket: S3Bucket) -> S3Archive:
    """The archive a prefect-aws S3Bucket block describes: its client, bucket and folder."""
    return S3Archive(bucket.credentials.get_s3_client(), bucket.bucket_name, bucket.bucket_folder)


def load_influx(settings: Settings) -> InfluxDB3Connection:
    try:
        return cast(InfluxDB3Connection, InfluxDB3Connection.load(INFLUX_BLOCK_NAME))
    except (ObjectNotFound, ValueError):
        return influx_from_settings(settings)
