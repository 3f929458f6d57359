"""Reviews in the Prefect UI: a detection worth a person's look opens a review-detection run, which shows the
clip's spectrogram and a link to its audio and suspends until someone resumes it with a verdict (Prefect's
interactive input: the UI draws the form from ReviewForm). A suspended run holds no process; resumed, it is
scheduled again, the station's executor runs it and the verdict is stored. Verdicts from the command line
(`birdflow review`) are stored the same way, by take_verdict.
"""

from __future__ import annotations

from datetime import datetime
from functools import cache
from typing import Any, Literal

import pyarrow as pa
from prefect import flow, get_client, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.flow_runs import suspend_flow_run
from prefect.input import RunInput
from prefect.runtime import flow_run
from prefect.states import Scheduled
from pydantic import Field

from birdflow.core.birdnet import model_labels
from birdflow.core.mqtt_messages import review_messages
from birdflow.core.reviews import (
    ReviewError,
    SpeciesNames,
    Verdict,
    id_of,
    review_candidates,
    review_page,
    verdict_from,
)
from birdflow.core.sinks import write_all
from birdflow.runtime.mqtt import topics_of
from flows.announce import has_artifacts
from flows.run_resources import RunResources, run_resources

REVIEW_FLOW = "review-detection"
ATTEMPTS = 5  # a form with an unknown species is asked again, this many times at most


class ReviewForm(RunInput):
    """The form the Prefect UI shows on Resume."""

    verdict: Literal["confirm", "reject", "relabel"] = Field(description="Is the model's label right?")
    relabel_to: str = Field("", description="For relabel: the species it was (scientific or common name)")
    reviewer: str = Field("", description="Who gives the verdict (a name or initials)")


@cache
def species_names() -> SpeciesNames:
    return SpeciesNames(model_labels())


def take_verdict(resources: RunResources, row: dict[str, Any], verdict: Verdict) -> None:
    """The verdict stored, the reviews table of the detection's day rewritten in every sink, and published."""
    day = resources.reviews.record(row, verdict)
    table = resources.reviews.table(day)
    write_all(resources.sinks, table, kind="reviews")
    if resources.outbox is not None:
        wanted = id_of(row)
        mine = [review for review in table.to_pylist() if review["detection_id"] == wanted]
        resources.outbox.put(review_messages(mine, topics_of(resources.settings)))


def open_reviews(table: pa.Table, rare_species: set[str], resources: RunResources) -> None:
    """Ask for reviews of the recording's rare species (and the sampled share of the rest), each in a review run
    of its own, once per detection however often the recording is rerun. A request is stored first: if its run
    cannot be created, `birdflow review list` still shows it."""
    options = resources.settings.detections
    rare = rare_species if options.review_rare else set()
    if table.num_rows == 0 or not (rare or options.review_sample_share):
        return
    asked = resources.reviews.request(review_candidates(table, rare, options.review_sample_share))
    if not asked:
        return
    try:
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name(f"{REVIEW_FLOW}/{resources.settings.station_id}")
            for row, reason in asked:
                client.create_flow_run_from_deployment(
                    deployment.id,
                    parameters={"detection": {**row, "time": row["time"].isoformat()}, "reason": reason},
                    name=f"review {row['common_name']} {row['listener_id']} {row['time']:%Y-%m-%d %H:%M:%S}",
                    idempotency_key=f"review-{id_of(row)}",
                    tags=["review", reason, row["listener_id"]],
                    state=Scheduled(),
                )
    except Exception as exc:  # the requests are stored; they wait in `birdflow review list`
        get_run_logger().warning("could not open review runs (%s); `birdflow review list` shows them", exc)


def clip_of(row: dict[str, Any], resources: RunResources) -> tuple[bytes | None, str | None]:
    """(the spectrogram PNG, where the clip's audio is) of the detection; (None, None) when it has no clip."""
    if not row.get("clip_key"):
        return None, None
    return resources.archive.fetch(row["clip_key"] + ".png"), resources.archive.uri(row["clip_key"] + ".flac")


@flow(name=REVIEW_FLOW, persist_result=False, log_prints=False)
def review_detection(detection: dict[str, Any], reason: str = "rare"):
    """Shows the detection and waits, suspended, for a verdict; a detection reviewed meanwhile (on the command
    line) ends the run with that verdict."""
    resources = run_resources()
    row = {**detection, "time": datetime.fromisoformat(detection["time"])}
    wanted = id_of(row)
    given = resources.reviews.verdict_of(wanted)
    if given:
        return {"detection_id": wanted, "verdict": given}
    page = review_page(row, reason, *clip_of(row, resources))
    if not has_artifacts(flow_run.id):  # the page once, not again each time the run is resumed
        create_markdown_artifact(page, description=f"review of detection {wanted}")
    problem = ""
    for attempt in range(ATTEMPTS):
        form = suspend_flow_run(
            wait_for_input=ReviewForm.with_initial_data(description=problem + page), key=f"verdict-{attempt}"
        )
        try:
            verdict = verdict_from(form.verdict, form.relabel_to, species_names(), form.reviewer or "prefect-ui", "ui")
        except ReviewError as exc:
            problem = f"**Not taken: {exc}.** Give the verdict again.\n\n"
            continue
        take_verdict(resources, row, verdict)
        get_run_logger().info("%s: %s by %s", wanted, verdict.verdict, verdict.reviewer)
        return {"detection_id": wanted, "verdict": verdict.verdict, "species": verdict.scientific_name}
    raise ReviewError(f"no valid verdict in {ATTEMPTS} forms; review {wanted} with `birdflow review`")
