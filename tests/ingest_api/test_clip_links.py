"""/clips on the ingest API for a browser holding a signed link (a review form's): the clip with no token, and
nothing for a link that expired, was altered, or names anything but a clip. The signing on its own first."""

from __future__ import annotations

import time

import httpx
import pytest

from birdflow.core.links import LinkKeyError, link_is_valid, link_key, signed_link
from birdflow.settings import Settings
from birdflow_tools.testbed import LOOPBACK
from tests.ingest_client import serving

CLIP = "clips/north/Spinus_tristis/2025/06/01/mic1_20250601T053000Z_e70acbef_3s"


def test_a_station_signs_with_one_key_of_its_own_that_every_process_reads(tmp_path):
    path = tmp_path / "state" / "links.key"
    key = link_key(path)
    assert link_key(path) == key and path.stat().st_mode & 0o077 == 0 and len(key) == 32
    link = signed_link("https://pi.example:8000/", "/clips/a.flac", key, 2_000_000_000)
    assert link.startswith("https://pi.example:8000/clips/a.flac?expires=2000000000&signature=")
    given = link.rsplit("=", 1)[1]
    assert link_is_valid(key, "/clips/a.flac", 2_000_000_000, given, now=1_900_000_000)
    assert not link_is_valid(key, "/clips/b.flac", 2_000_000_000, given, now=1_900_000_000)  # another clip
    assert not link_is_valid(key, "/clips/a.flac", 2_000_000_001, given, now=1_900_000_000)  # a later expiry
    assert not link_is_valid(key, "/clips/a.flac", 2_000_000_000, given, now=2_000_000_001)  # expired
    path.write_bytes(b"short")
    with pytest.raises(LinkKeyError, match="damaged"):
        link_key(path)


def test_the_run_threads_of_one_process_making_the_key_at_once_all_get_the_same_one(tmp_path):
    """The worker's review runs start together on a new station: one key, made once, and no thread fails."""
    from concurrent.futures import ThreadPoolExecutor

    for attempt in range(20):
        path = tmp_path / f"station{attempt}" / "links.key"
        with ThreadPoolExecutor(8) as threads:
            keys = list(threads.map(link_key, [path] * 8))
        assert len(set(keys)) == 1 and link_key(path) == keys[0]
        assert [item.name for item in path.parent.iterdir()] == ["links.key"]  # no partial file left behind


def test_the_station_serves_a_clip_to_its_signed_link_only(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", ingest_auth="on")  # no token needed: the link is the permission
    for suffix, data in ((".flac", b"fLaC audio"), (".png", b"\x89PNG picture")):
        stored = settings.local_archive_dir / (CLIP + suffix)
        stored.parent.mkdir(parents=True, exist_ok=True)
        stored.write_bytes(data)
    key = link_key(settings.link_key_file)
    later = int(time.time()) + 600
    with serving(settings) as port:
        base = f"http://{LOOPBACK}:{port}"

        def fetch(path: str, expires: int = later, signed_path: str | None = None) -> httpx.Response:
            link = signed_link(base, signed_path or path, key, expires)
            return httpx.get(base + path + "?" + link.split("?", 1)[1], timeout=10)

        clip = fetch(f"/{CLIP}.flac")
        assert (clip.status_code, clip.headers["content-type"], clip.content) == (200, "audio/flac", b"fLaC audio")
        assert fetch(f"/{CLIP}.png").headers["content-type"] == "image/png"
        assert fetch(f"/{CLIP}.flac", expires=int(time.time()) - 1).status_code == 403  # expired
        assert fetch(f"/{CLIP}.png", signed_path=f"/{CLIP}.flac").status_code == 403  # another clip's link
        assert httpx.get(f"{base}/{CLIP}.flac", timeout=10).status_code == 403  # no link at all
        assert "expired or was not signed" in httpx.get(f"{base}/{CLIP}.flac", timeout=10).json()["error"]
        # dot segments sent as they are (percent-encoded, so no client folds them away), signed or not
        for elsewhere in ("/clips/%2E%2E/state/links.key", "/clips/x/%2E%2E/%2E%2E/settings.flac", f"/{CLIP}.txt"):
            assert fetch(elsewhere).status_code == 404, elsewhere
            assert fetch(elsewhere, signed_path=elsewhere.replace("%2E", ".")).status_code == 404, elsewhere
        assert fetch("/clips/north/gone_3s.flac").json()["error"].startswith("the clip is no longer in the archive")
