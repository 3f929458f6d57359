"""Links a browser elsewhere opens to a detection's clip: the station's /clips, signed (birdflow.core.links), from
its public_url. Exports (Darwin Core's associatedMedia) and MQTT messages carry them."""

from __future__ import annotations

import time

from birdflow.core.links import link_key, signed_link
from birdflow.settings import Settings


def clip_links(settings: Settings, rows: list[dict]) -> dict[str, str]:
    """Clip key -> a link a browser opens for clip_link_days (the station's /clips, signed); none without
    public_url: a link to this machine's own address opens nowhere else."""
    if not settings.ingest.public_url:
        return {}
    key = link_key(settings.link_key_file)
    expires = int(time.time() + settings.detections.clip_link_days * 86400)
    return {
        row["clip_key"]: signed_link(settings.station_url, f"/{row['clip_key']}.flac", key, expires)
        for row in rows
        if row["clip_key"]
    }
