"""Prefect blocks for the external systems birdflow writes to, registered from the settings.

The settings stay the one source of configuration; `birdflow blocks register` (and `birdflow up`) mirror
them into blocks so the Prefect UI shows, and flow runs on any worker load, the same configuration.
"""

from __future__ import annotations

from prefect.blocks.core import Block
from prefect.exceptions import ObjectNotFound
from prefect_aws import AwsClientParameters, AwsCredentials, S3Bucket
from pydantic import Field, SecretStr

from birdflow.settings import Settings

INFLUX_BLOCK_NAME = "birdflow-influxdb3"


class InfluxDB3Connection(Block):
    """An InfluxDB 3 database and table that receive detection rows."""

    _block_type_name = "Birdflow InfluxDB3 Connection"
    _description = "Where birdflow writes detections in InfluxDB 3 (host, database, table, token)."

    host: str = Field(..., description="InfluxDB 3 URL, e.g. http://127.0.0.1:8181")
    database: str = Field("birdflow", description="Database that receives the detections")
    table: str = Field("detections", description="Table (measurement) name")
    token: SecretStr = Field(SecretStr(""), description="Token with write access to the database")


def s3_bucket_from_settings(settings: Settings) -> S3Bucket:
    client_parameters = AwsClientParameters(endpoint_url=settings.s3_endpoint_url or None)
    credentials = AwsCredentials(
        aws_access_key_id=settings.aws_access_key_id or None,
        aws_secret_access_key=settings.aws_secret_access_key.get_secret_value() or None,
        region_name=settings.s3_region,
        aws_client_parameters=client_parameters,
    )
    return S3Bucket(bucket_name=settings.s3_bucket, bucket_folder=settings.s3_prefix, credentials=credentials)


def influx_from_settings(settings: Settings) -> InfluxDB3Connection:
    return InfluxDB3Connection(
        host=settings.influx_host,
        database=settings.influx_database,
        table=settings.influx_table,
        token=settings.influx_token,
    )


def register_blocks(settings: Settings) -> list[str]:
    """Create or update the blocks the settings describe; returns their slugs."""
    saved = []
    if settings.archive_backend == "s3":
        s3_bucket_from_settings(settings).save(settings.s3_block_name, overwrite=True)
        saved.append(f"s3-bucket/{settings.s3_block_name}")
    if settings.influx_enabled:
        influx_from_settings(settings).save(INFLUX_BLOCK_NAME, overwrite=True)
        saved.append(f"birdflow-influxdb3-connection/{INFLUX_BLOCK_NAME}")
    return saved


def load_s3_bucket(settings: Settings) -> S3Bucket:
    """The registered block (it may have been edited in the UI), else one built from the settings."""
    try:
        return S3Bucket.load(settings.s3_block_name)
    except (ObjectNotFound, ValueError):
        return s3_bucket_from_settings(settings)


def load_influx(settings: Settings) -> InfluxDB3Connection:
    try:
        return InfluxDB3Connection.load(INFLUX_BLOCK_NAME)
    except (ObjectNotFound, ValueError):
        return influx_from_settings(settings)
