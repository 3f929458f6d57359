"""Pages as a person sees them: headless Chromium (Debian's `chromium`) after the page's scripts ran."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

# no background traffic to hosts this machine cannot reach, a profile of its own each time; a desktop's window
# (at Chromium's headless default, 800 x 600, Prefect's UI lays its run list out for a phone and leaves it out)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=15000",
    "--window-size=1400,1000",
]


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    browser = shutil.which("chromium")
    if not browser:
        pytest.skip("chromium is not installed (Debian: apt install chromium)")
    return subprocess.run(
        [browser, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=120
    )


def rendered(
    url: str, profile: Path, screenshot: Path | None = None, showing: tuple[str, ...] = (), attempts: int = 3
) -> str:
    """The page's DOM once its scripts ran; with `screenshot`, also a PNG of it. With `showing`, loaded again
    (up to `attempts` times) until the DOM holds all of those texts: on a busy machine a single-page app may
    still be waiting for its API when the browser's time budget ends. The last DOM is returned either way."""
    for attempt in range(attempts):
        page = _chromium("--dump-dom", url, profile=profile / f"dom{attempt}").stdout
        if all(text in page for text in showing):
            break
    if screenshot:
        _chromium(f"--screenshot={screenshot}", url, profile=profile / "shot")
    return page
