"""The station's review store is the one source of truth for review runs, executed by a real `birdflow execute`
on a real Prefect server: a detection decided before its run first asked ends that run at once; a run still waiting
for a detection decided elsewhere (a command line that could not reach Prefect) is ended by end_decided_reviews, as
the maintenance run calls it; a form submitted after such a verdict is the later verdict and replaces it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterIdempotencyKey
from prefect.flow_runs import resume_flow_run

from birdflow.core.reviews import Verdict, id_of
from birdflow.flows.review import end_decided_reviews, open_reviews
from birdflow.flows.run_resources import RunResources
from birdflow.settings import Settings
from birdflow_tools.testbed import stop_process, wait_until
from tests.builders import two_listeners_detections

pytestmark = pytest.mark.e2e
STATION = "review-truth"


@pytest.fixture
def executor(prefect_server, tmp_path):
    """`birdflow execute` of a station on the session's Prefect server, ready; its settings."""
    settings = Settings(station_id=STATION, data_dir=tmp_path / "data", prefect_api_url=prefect_server.api_url)
    settings_file = tmp_path / "settings.yaml"
    settings_file.write_text(
        yaml.safe_dump({"station_id": STATION, "data_dir": str(settings.data_dir), "poll_interval_s": 0.5})
    )
    log = tmp_path / "executor.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "birdflow.app.cli", "--settings", str(settings_file), "execute"],
        env={**os.environ, "PREFECT_API_URL": prefect_server.api_url},
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until(lambda: "executor ready" in log.read_text(), 120, "the executor")
        yield settings
    finally:
        stop_process(process, grace_s=20)


def run_of(client, row):
    key = FlowRunFilterIdempotencyKey(any_=[f"review-{id_of(row)}"])
    [run] = client.read_flow_runs(flow_run_filter=FlowRunFilter(idempotency_key=key))
    return run


def state_of(client, row) -> tuple[str, str | None]:
    run = run_of(client, row)
    return run.state.type.value, run.state.state_details.pause_key


def test_a_verdict_given_elsewhere_ends_the_run_and_a_later_form_replaces_it(executor):
    resources = RunResources(executor)
    decided_first, waiting, answered_later = two_listeners_detections().to_pylist()[:3]
    resources.reviews.record(decided_first, Verdict("confirmed", "ada", "cli"))  # before its run ever asked
    open_reviews([(decided_first, "rare"), (waiting, "rare"), (answered_later, "sample")], resources)
    with get_client(sync_client=True) as client:
        wait_until(lambda: state_of(client, decided_first)[0] == "COMPLETED", 60, "the decided detection's run")
        for row in (waiting, answered_later):
            wait_until(lambda row=row: state_of(client, row) == ("PAUSED", "verdict-0"), 60, "a run waiting")

        # decided on a command line that could not reach Prefect: the maintenance run's sweep ends its run
        resources.reviews.record(waiting, Verdict("rejected", "bo", "cli"))
        resources.reviews.record(answered_later, Verdict("confirmed", "bo", "cli"))
        ended = end_decided_reviews(client, resources)
        assert sorted(ended) == sorted([id_of(waiting), id_of(answered_later)])
        assert state_of(client, waiting)[0] == "COMPLETED"
        assert run_of(client, waiting).state.message == "rejected by bo (cli)"
        assert end_decided_reviews(client, resources) == []  # nothing waits any more

    # a form filled in on a page opened before the command-line verdict: the later verdict, taken
    decided = two_listeners_detections().to_pylist()[3]
    open_reviews([(decided, "rare")], resources)
    with get_client(sync_client=True) as client:
        wait_until(lambda: state_of(client, decided) == ("PAUSED", "verdict-0"), 60, "the fourth run waiting")
        resources.reviews.record(decided, Verdict("confirmed", "ada", "cli"))
        resume_flow_run(
            run_of(client, decided).id,
            run_input={"verdict": "relabel", "relabel_to": "Pine Siskin", "reviewer": "cy"},
        )
        wait_until(lambda: state_of(client, decided)[0] == "COMPLETED", 60, "the resumed run")
    latest = resources.reviews.verdict_given(id_of(decided))
    assert latest is not None and (latest.verdict, latest.common_name, latest.reviewer, latest.via) == (
        "relabelled",
        "Pine Siskin",
        "cy",
        "ui",
    )
    assert resources.reviews.table().num_rows == 4  # one verdict per detection, the latest
