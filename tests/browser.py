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


class Page:
    """A page in headless Chromium that a test acts on as a person would (clicks, typing), driven through the
    DevTools protocol on a loopback port."""

    def __init__(self, profile: Path):
        browser = shutil.which("chromium")
        if not browser:
            pytest.skip("chromium is not installed (Debian: apt install chromium)")
        flags = [flag for flag in FLAGS if not flag.startswith("--virtual-time-budget")]
        self.process = subprocess.Popen(
            [browser, *flags, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._ids = iter(range(1, 1_000_000))
        try:
            self.socket = self._connect()
        except BaseException:
            self.close()
            raise

    def _connect(self):
        import httpx
        from websockets.sync.client import connect

        assert self.process.stderr is not None
        for line in self.process.stderr:  # "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/..."
            if line.startswith("DevTools listening on "):
                port = line.split("ws://127.0.0.1:", 1)[1].split("/", 1)[0]
                break
        else:
            raise RuntimeError("chromium said no DevTools address")
        [page] = [
            target for target in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if target["type"] == "page"
        ]
        return connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)

    def command(self, method: str, **params):
        import json

        number = next(self._ids)
        self.socket.send(json.dumps({"id": number, "method": method, "params": params}))
        while True:
            reply = json.loads(self.socket.recv(timeout=60))
            if reply.get("id") == number:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def open(self, url: str) -> None:
        """Navigate, and return once the new document has loaded (the old one may answer until then)."""
        before = self.evaluate("performance.timeOrigin")
        self.command("Page.navigate", url=url)
        self.wait_for(f"performance.timeOrigin !== {before!r} && document.readyState === 'complete'")

    def evaluate(self, expression: str):
        """The expression's value (awaited when it is a promise), as JSON."""
        result = self.command("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}...: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 60.0):
        """The expression's value once it is truthy (the page's scripts render as they like)."""
        import time

        deadline = time.monotonic() + timeout_s
        while not (value := self.evaluate(expression)):
            if time.monotonic() > deadline:
                text = self.evaluate("document.body ? document.body.innerText.slice(0, 2000) : ''")
                raise AssertionError(f"not on the page within {timeout_s:.0f} s: {expression}\npage:\n{text}")
            time.sleep(0.25)
        return value

    def type_text(self, text: str) -> None:
        """Typed into the focused element, as keystrokes are."""
        self.command("Input.insertText", text=text)

    def screenshot(self, path: Path) -> None:
        import base64

        path.write_bytes(base64.b64decode(self.command("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        socket = getattr(self, "socket", None)
        if socket is not None:
            socket.close()
        self.process.kill()
        self.process.wait(timeout=30)
