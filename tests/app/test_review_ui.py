"""Reviews as people give them on a station started with `birdflow up`: on one box, and on a station that keeps its
own run history beside a fleet's central Prefect (with its relay). Each runs the review story (tests/review_story.py):
the soundscape uploaded, a review resumed in the Prefect UI after its clip played in the browser, another decided on
the command line, both verdicts read back from SQL, MQTT and an export."""

from __future__ import annotations

import pytest

from birdflow_tools.stack import Stack
from birdflow_tools.testbed import LOOPBACK
from tests.conftest import require_sample
from tests.review_story import SOUNDSCAPE, Shape, Subscriber, run_review_story
from tests.servers import PrefectServer

pytestmark = pytest.mark.e2e


def station_shape(stack: Stack, subscriber: Subscriber, tmp_path) -> Shape:
    def cli(*args: str) -> str:
        done = stack.cli(*args)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    return Shape(
        station_id=stack.station_id,
        ui_url=f"http://{LOOPBACK}:{stack.prefect_port}",
        cli=cli,
        export_dir=(str(tmp_path / "exports"), tmp_path / "exports"),
        subscriber=subscriber,
        profile=tmp_path / "browser",
    )


def mqtt_of(broker) -> dict:
    return {"mqtt_host": LOOPBACK, "mqtt_port": broker.port}


def test_reviews_on_a_station_started_with_up(tmp_path, mosquitto):
    require_sample(SOUNDSCAPE)
    stack = Stack(tmp_path, station_id="review-up", settings=mqtt_of(mosquitto))
    subscriber = Subscriber(mosquitto, stack.station_id)
    try:
        stack.start()
        stack.upload("mic1_20250601T053000Z.mp3", SOUNDSCAPE.read_bytes())
        run_review_story(station_shape(stack, subscriber, tmp_path), stack.log_tail, typo_first=True)
    finally:
        subscriber.close()
        stack.stop()


def test_reviews_on_a_station_with_its_own_history_and_the_relay(tmp_path, mosquitto):
    require_sample(SOUNDSCAPE)
    central = PrefectServer(tmp_path / "central").start(tmp_path / "central.log")
    settings = {**mqtt_of(mosquitto), "central_api_url": central.api_url}
    stack = Stack(tmp_path / "station", station_id="review-own", settings=settings)
    (tmp_path / "station").mkdir()
    subscriber = Subscriber(mosquitto, stack.station_id)
    try:
        stack.start()
        assert stack.child("relay") is not None, stack.log_tail()
        stack.upload("mic1_20250601T053000Z.mp3", SOUNDSCAPE.read_bytes())
        run_review_story(station_shape(stack, subscriber, tmp_path), stack.log_tail)
        # the review runs are the station's own; the central server has none of them
        assert central_review_runs(central) == []
    finally:
        subscriber.close()
        stack.stop()
        central.stop()


def central_review_runs(central: PrefectServer) -> list:
    import httpx

    response = httpx.post(
        f"{central.api_url}/flow_runs/filter", json={"flows": {"name": {"any_": ["review-detection"]}}}, timeout=30
    )
    response.raise_for_status()
    return response.json()
