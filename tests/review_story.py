"""The review story that each documented shape of a station runs end to end (docs/operating.md, "Reviews"): the
multi-species soundscape analysed, its rare species waiting in review runs; one run resumed from the Prefect UI in
headless Chromium after its clip link played in that browser; another detection decided on the command line, which
ends its run; both verdicts read back from `birdflow sql`, a real Mosquitto and an export."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import paho.mqtt.client as mqtt
import soundfile

from birdflow.core.reviews import id_of
from birdflow_tools.testbed import LOOPBACK, Mosquitto, wait_until
from tests.browser import Page
from tests.conftest import SHARED_AUDIO

SOUNDSCAPE = SHARED_AUDIO / "soundscape_xc563936.mp3"
REVIEW_RUNS = {"flows": {"name": {"any_": ["review-detection"]}}}
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


class Subscriber:
    """What a station publishes under birdflow/<station>/#, as a QoS 1 subscriber receives it."""

    def __init__(self, broker: Mosquitto, station_id: str):
        self.received: list[tuple[str, Any]] = []  # a JSON document, else the payload as it came
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"story-{station_id}")
        self.client.on_connect = lambda client, *_: client.subscribe(f"birdflow/{station_id}/#", qos=1)
        self.client.on_message = lambda client, userdata, message: self.received.append(
            (message.topic, json.loads(message.payload) if message.payload.startswith(b"{") else message.payload)
        )
        self.client.connect(LOOPBACK, broker.port)
        self.client.loop_start()
        wait_until(self.client.is_connected, 10, "the MQTT subscriber's connection")

    def reviews(self) -> dict[str, dict]:
        """The latest review message per detection id."""
        return {payload["detection_id"]: payload for topic, payload in self.received if topic.endswith("/review")}

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@dataclass
class Shape:
    """One way of running a station, as the story needs it."""

    station_id: str
    ui_url: str  # the Prefect UI that shows the station's review runs (its API under /api)
    cli: Callable[..., str]  # `birdflow <args>` as people run it in this shape: its output (it must succeed)
    export_dir: tuple[str, Path]  # a folder for `birdflow export`: as the command sees it, as this test reads it
    subscriber: Subscriber
    profile: Path  # the browser's profile
    ui_login: str = ""  # user:password of a Prefect server that asks for one (PREFECT_API_AUTH_STRING)

    @property
    def auth(self) -> tuple[str, str] | None:
        user, _, password = self.ui_login.partition(":")
        return (user, password) if self.ui_login else None

    def api(self, path: str, body: dict | None = None) -> Any:
        response = httpx.request(
            "POST" if body is not None else "GET",
            f"{self.ui_url}/api/{path}",
            json=body,
            auth=self.auth,
            timeout=30,
        )
        response.raise_for_status()
        return response.json()

    def review_runs(self) -> list[dict]:
        return self.api(
            "flow_runs/filter", {**REVIEW_RUNS, "deployments": {"name": {"any_": [self.station_id]}}, "limit": 50}
        )

    def run_page(self, run: dict) -> str:
        """The run's page as birdflow links it: through the UI's login when the server asks for a password."""
        path = f"/runs/flow-run/{run['id']}"
        return f"{self.ui_url}/login?{urlencode({'redirect': path})}" if self.ui_login else f"{self.ui_url}{path}"


def waiting_for_a_verdict(shape: Shape, at_least: int, timeout_s: float, log: Callable[[], str]) -> list[dict]:
    """The station's review runs once `at_least` of them wait for their first form."""
    deadline = time.monotonic() + timeout_s
    while True:
        runs = shape.review_runs()
        waiting = [
            run
            for run in runs
            if run["state_type"] == "PAUSED" and run["state"]["state_details"].get("pause_key") == "verdict-0"
        ]
        if len(waiting) >= at_least:
            return sorted(waiting, key=lambda run: run["name"])
        if any(run["state_type"] in ("FAILED", "CRASHED") for run in runs) or time.monotonic() > deadline:
            states = [(run["name"], run["state_type"], run["state"]["message"]) for run in runs]
            raise AssertionError(f"review runs {states}, not {at_least} waiting\n{log()}")
        time.sleep(1)


def asked_again(shape: Shape, run: dict) -> bool:
    return shape.api(f"flow_runs/{run['id']}")["state"]["state_details"].get("pause_key") == "verdict-1"


def state_of(shape: Shape, run: dict) -> str:
    return shape.api(f"flow_runs/{run['id']}")["state_type"]


def field(label: str) -> str:
    """The form's property whose label starts with `label` (Prefect's schema form)."""
    return (
        "[...document.querySelectorAll('.p-modal .schema-form-property')]"
        f".find(p => p.querySelector('.schema-form-property__label').innerText.startsWith('{label}'))"
    )


def button(text: str, within: str = "document") -> str:
    return f"[...{within}.querySelectorAll('button')].find(b => b.innerText.trim() === '{text}')"


PASSWORD = "document.querySelector('input[type=password]')"


def log_in(page: Page, url: str, login: str, then: str = "document.querySelector('main')") -> None:
    """Open `url`; when the Prefect UI asks for its password there, give it (it then opens what the link names)."""
    page.open(url)
    if page.wait_for(f"{PASSWORD} ? 'login' : ({then}) ? 'in' : ''") == "login":
        assert login, "the Prefect UI asks for a password"
        page.evaluate(f"{PASSWORD}.focus()")
        page.type_text(login)
        page.evaluate(button("Login") + ".click()")
        page.wait_for(f"!{PASSWORD}")


def open_form(page: Page, run_url: str, login: str = "") -> str:
    """The run's page (logged in first when the UI asks), Resume pressed: returns what the form's description says."""
    log_in(page, run_url, login, then="!!" + button("Resume"))
    page.wait_for("!!" + button("Resume"))
    page.evaluate(button("Resume") + ".click()")
    page.wait_for(f"!!{field('Reviewer')}")
    return page.evaluate("document.querySelector('.p-modal .markdown-renderer').innerText")


def fill_form(page: Page, verdict: str, texts: dict[str, str]) -> None:
    """Choose the verdict and type the texts, until the form holds them a moment later: the UI may still be
    setting the form's initial values when it first shows it."""
    choose = (
        f"(() => {{ const choice = {field('Verdict')}.querySelector('select'); choice.value = '{verdict}';"
        " for (const kind of ['input', 'change']) choice.dispatchEvent(new Event(kind, {bubbles: true})); })()"
    )
    held = " && ".join(
        [f"{field('Verdict')}.querySelector('select').value === '{verdict}'"]
        + [f"{field(label)}.querySelector('textarea').value === {text!r}" for label, text in texts.items()]
    )
    for _ in range(10):
        page.evaluate(choose)
        for label, text in texts.items():
            page.evaluate(f"{field(label)}.querySelector('textarea').select()")  # typing replaces what is there
            page.type_text(text)
        time.sleep(0.5)
        if page.evaluate(held):
            return
    raise AssertionError("the review form did not keep what was typed into it")


def give_verdict(page: Page, run_url: str, verdict: str, species: str, reviewer: str, login: str = "") -> str:
    """Open the run, press Resume, fill the form, submit; returns what the form's description said."""
    described = open_form(page, run_url, login)
    fill_form(page, verdict, {"Relabel": species, "Reviewer": reviewer})
    submit = button("Submit", "document.querySelector('.p-modal')") + ".click()"
    page.evaluate(submit)
    # Prefect's UI answers a failed resume call (a busy server) with "Oops. Something went wrong." and keeps the
    # form filled in: a reviewer presses Submit again, once
    closed_or_failed = "!document.querySelector('.p-modal') || document.body.innerText.includes('Something went wrong')"
    page.wait_for(closed_or_failed)
    if page.evaluate("!!document.querySelector('.p-modal')"):
        page.evaluate(submit)
    page.wait_for("!document.querySelector('.p-modal')")
    return described


def listen(page: Page, link: str) -> float:
    """The clip link opened as a person clicks it: it must answer 200 with audio that the browser plays; returns
    the clip's duration as the browser decoded it."""
    page.open(link)
    status = page.evaluate("performance.getEntriesByType('navigation')[0].responseStatus")
    kind = page.evaluate("document.contentType")
    assert (status, kind) == (200, "audio/flac"), (status, kind, link)
    return page.wait_for(
        "(() => { const media = document.querySelector('video, audio');"
        " return media && media.readyState >= 1 && media.duration; })()"
    )


def run_review_story(shape: Shape, log: Callable[[], str], typo_first: bool = False) -> None:
    """The story; with `typo_first`, the form is first given a species the model does not know, and must ask
    again on the same run."""
    waiting = waiting_for_a_verdict(shape, 2, 300, log)
    in_ui, by_cli = waiting[0], waiting[1]
    detection = in_ui["parameters"]["detection"]
    other = by_cli["parameters"]["detection"]
    ui_id, cli_id = id_of(detection), id_of(other)
    page = Page(shape.profile)
    try:
        described = open_form(page, shape.run_page(in_ui), shape.ui_login)
        assert ui_id in described and detection["common_name"] in described
        # the spectrogram, drawn by the browser from the form's description, and the clip's audio linked
        assert (
            page.wait_for(
                "(() => { const image = document.querySelector('.p-modal img');"
                " return image && image.complete && image.naturalWidth; })()"
            )
            > 100
        )
        page.screenshot(shape.profile.parent / "review-form.png")  # as the reviewer sees it, kept with the test
        link = page.evaluate("document.querySelector('.p-modal .markdown-renderer a').href")
        assert page.evaluate("document.querySelector('.p-modal .markdown-renderer a').innerText").startswith(
            "Listen to the clip (FLAC"
        )
        clip = httpx.get(link, timeout=30)
        assert clip.status_code == 200 and clip.headers["content-type"] == "audio/flac", clip.text[:300]
        samples, rate = soundfile.read(io.BytesIO(clip.content))
        assert len(samples) / rate >= 3.0  # the 3 s window and its padding
        assert abs(listen(page, link) - len(samples) / rate) < 0.1

        relabel_to = "Pine Siskin" if detection["common_name"] != "Pine Siskin" else "American Goldfinch"
        if typo_first:
            give_verdict(
                page, shape.run_page(in_ui), "relabel", relabel_to[:-2] + relabel_to[-1], "ada", shape.ui_login
            )
            wait_until(lambda: asked_again(shape, in_ui), 60, "the form asked again")
        described = give_verdict(page, shape.run_page(in_ui), "relabel", relabel_to, "ada", shape.ui_login)
        if typo_first:
            assert f"Not taken: '{relabel_to[:-2] + relabel_to[-1]}' is no species of the model" in described
        wait_until(lambda: state_of(shape, in_ui) in FINAL, 120, "the resumed review run's end")
        assert state_of(shape, in_ui) == "COMPLETED", log()
    finally:
        page.close()

    said = shape.cli("review", "confirm", cli_id, "--by", "bo")
    assert f"{cli_id}: confirmed" in said and "1 review run(s) waiting in the Prefect UI ended" in said, said
    assert state_of(shape, by_cli) == "COMPLETED"

    stored = json.loads(
        shape.cli(
            "sql", "--format", "json", "SELECT detection_id, verdict, reviewed_common_name, reviewer, via FROM reviews"
        )
    )
    assert {
        row["detection_id"]: (row["verdict"], row["reviewed_common_name"], row["reviewer"], row["via"])
        for row in stored
    } == {
        ui_id: ("relabelled", relabel_to, "ada", "ui"),
        cli_id: ("confirmed", other["common_name"], "bo", "cli"),
    }
    wait_until(lambda: {ui_id, cli_id} <= set(shape.subscriber.reviews()), 60, "the verdicts on MQTT")
    published = shape.subscriber.reviews()
    assert (published[ui_id]["verdict"], published[ui_id]["reviewed_common_name"]) == ("relabelled", relabel_to)
    assert (published[cli_id]["verdict"], published[cli_id]["reviewer"]) == ("confirmed", "bo")

    as_seen, readable = shape.export_dir
    shape.cli("export", "--format", "csv", "--reviewed-only", "--output", as_seen)
    exported = list(csv.DictReader(io.StringIO((readable / "detections.csv").read_text())))
    heard = {
        (row["recording_id"], float(row["start_s"])): (row["detection_id"], row["verdict"], row["reviewed_common_name"])
        for row in exported
    }
    assert heard == {
        (detection["recording_id"], detection["start_s"]): (ui_id, "relabelled", relabel_to),
        (other["recording_id"], other["start_s"]): (cli_id, "confirmed", other["common_name"]),
    }
