"""What an export needs besides the detections, gathered from the station's settings and state files: its place
(time zone found from the coordinates), how its records are published, the verdicts, what each listener recorded,
where the audio is archived and links to the clips. `birdflow export` and the export flow share it."""

from __future__ import annotations

from datetime import timedelta
from functools import cache

import pyarrow as pa
import pyarrow.compute as pc

from birdflow.core.exports import Evidence, Place, Publishing
from birdflow.core.reviews import ReviewStore, detection_ids
from birdflow.runtime.clip_links import clip_links
from birdflow.runtime.state_files import processed_ledger
from birdflow.settings import Settings

LONGEST_RECORDING = timedelta(hours=2)  # a recording that holds a detection started at most this long before it


@cache
def timezone_at(latitude: float, longitude: float) -> str | None:
    """The IANA time zone at the coordinates (timezonefinder's map; offshore: the nautical Etc/GMT zone)."""
    from timezonefinder import TimezoneFinder

    return TimezoneFinder().timezone_at(lat=latitude, lng=longitude)


def place_of(settings: Settings) -> Place:
    latitude, longitude = settings.analysis.latitude, settings.analysis.longitude
    exports = settings.exports
    zone = exports.timezone or None
    if zone is None and latitude is not None and longitude is not None:
        zone = timezone_at(latitude, longitude)
    return Place(
        settings.station_id,
        latitude,
        longitude,
        zone,
        exports.country_code,
        exports.state_code,
        exports.coordinate_uncertainty_m,
    )


def publishing_of(settings: Settings) -> Publishing:
    exports = settings.exports
    return Publishing(
        exports.dataset_title,
        exports.dataset_license,
        exports.rights_holder,
        exports.contact_name,
        exports.contact_email,
        exports.ebird_min_confidence,
    )


def evidence_for(settings: Settings, table: pa.Table) -> Evidence:
    """Verdicts, recorded spans, audio paths and clip links of the detections in `table` (read, never created:
    a station without reviews or a ledger exports without them)."""
    if table.num_rows == 0:
        return Evidence()
    wanted = set(detection_ids(table))
    verdicts = {}
    if settings.reviews_file.exists():
        for row in ReviewStore(settings.reviews_file).table().to_pylist():
            if row["detection_id"] in wanted:
                verdicts[row["detection_id"]] = row
    times = table.column("time")
    recorded = {}
    if settings.processed_record_file.exists():
        since = pc.min(times).as_py() - LONGEST_RECORDING
        until = pc.max(times).as_py() + timedelta(seconds=1)
        recorded = processed_ledger(settings).recorded_spans(since, until)
    rows = table.select(["time", "start_s", "station_id", "listener_id", "recording_id", "clip_key"]).to_pylist()
    return Evidence(verdicts, recorded, audio_paths(settings, rows), clip_links(settings, rows))


def audio_paths(settings: Settings, rows: list[dict]) -> dict[str, str]:
    """Recording id -> its archived audio: the file in the local archive (the FLAC where there is one), or the
    key in the S3 bucket of the format the station archives in."""
    found: dict[str, str] = {}
    for row in rows:
        recording_id = row["recording_id"]
        if recording_id in found:
            continue
        day = (row["time"] - timedelta(seconds=row["start_s"])).strftime("%Y/%m/%d")
        key = f"{row['station_id']}/{row['listener_id']}/{day}"
        archive = settings.archive
        if archive.archive_backend == "s3":
            prefix = f"{archive.s3_prefix.strip('/')}/" if archive.s3_prefix.strip("/") else ""
            found[recording_id] = f"s3://{archive.s3_bucket}/{prefix}{key}/{recording_id}.{archive.archive_format}"
            continue
        folder = settings.local_archive_dir / key
        kept = sorted(folder.glob(f"{recording_id}.*"), key=lambda path: path.suffix != ".flac")
        if kept:
            found[recording_id] = str(kept[0].resolve())
    return found
