"""Reviews in the Prefect UI: a detection worth a person's look opens a review-detection run, which shows the
clip's spectrogram and links to its audio and suspends until someone resumes it with a verdict (Prefect's
interactive input: the UI draws the form from ReviewForm). A suspended run holds no process; resumed, it is
scheduled again, whatever runs the station's runs (its executor, `birdflow worker`) runs it and the verdict is
stored.

The station's review store is the one source of truth. A verdict given anywhere else (`birdflow review`, a CSV)
is stored by take_verdict too, and ends the run still waiting for it (end_decided_reviews): the form never asks
again about a decided detection. A verdict given later, wherever, replaces the earlier one everywhere.
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from functools import cache
from typing import Any, Literal

import pyarrow as pa
from prefect import flow, get_client, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterName,
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.context import FlowRunContext
from prefect.flow_runs import suspend_flow_run
from prefect.input import RunInput
from prefect.runtime import flow_run
from prefect.states import Completed, Scheduled
from pydantic import Field

from birdflow.core.archive import PRESIGNED_MAX_S
from birdflow.core.birdnet import model_labels
from birdflow.core.links import link_key, signed_link
from birdflow.core.mqtt_messages import removed_species_messages, review_messages
from birdflow.core.reviews import (
    REVIEWER_MAX,
    SPECIES_TEXT_MAX,
    WRONG_VERDICTS,
    ReviewError,
    SpeciesNames,
    Verdict,
    id_of,
    one_line,
    review_candidates,
    review_page,
    verdict_from,
)
from birdflow.core.sinks import write_all
from birdflow.flows.announce import has_artifacts
from birdflow.flows.run_resources import RunResources, run_resources
from birdflow.runtime.mqtt import topics_of

REVIEW_FLOW = "review-detection"
ATTEMPTS = 5  # a form with an unknown species is asked again, this many times at most
IDEMPOTENCY_PREFIX = "review-"  # + the detection id: one review run per detection
PAGE = 200


class ReviewForm(RunInput):
    """The form the Prefect UI shows on Resume."""

    verdict: Literal["confirm", "reject", "relabel"] = Field(description="Is the model's label right?")
    relabel_to: str = Field(
        "", max_length=SPECIES_TEXT_MAX, description="For relabel: the species it was (scientific or common name)"
    )
    reviewer: str = Field("", max_length=REVIEWER_MAX, description="Who gives the verdict (a name or initials)")


def markdown_text(text: str) -> str:
    """Text that markdown shows as it is: its markup characters escaped, on one line."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~])", r"\\\1", one_line(text, 400))


@cache
def species_names() -> SpeciesNames:
    return SpeciesNames(model_labels())


def take_verdict(resources: RunResources, row: dict[str, Any], verdict: Verdict) -> None:
    take_verdicts(resources, [(row, verdict)])


def take_verdicts(resources: RunResources, decided: list[tuple[dict[str, Any], Verdict]]) -> None:
    """The verdicts stored in one transaction (replacing earlier ones), the reviews table of each day they touch
    rewritten once in every sink, and published."""
    days = resources.reviews.record_all(decided)
    tables = {day: resources.reviews.table(day) for day in sorted(days)}
    for table in tables.values():
        write_all(resources.sinks, table, kind="reviews")
    if resources.outbox is None:
        return
    topics = topics_of(resources.settings)
    wanted = {id_of(row): (row, verdict) for row, verdict in decided}
    mine = [review for table in tables.values() for review in table.to_pylist() if review["detection_id"] in wanted]
    messages = review_messages(mine, topics)
    for key, (row, verdict) in wanted.items():
        if verdict.verdict in WRONG_VERDICTS:
            messages += removed_species_messages(row["scientific_name"], key, topics, resources.mqtt_state)
    resources.outbox.put(messages)


def reviews_wanted(table: pa.Table, rare_species: set[str], resources: RunResources) -> list[tuple[dict, str]]:
    """(detection row, reason) of the recording's rare species (and the sampled share of the rest) not asked
    about before: the same rows on every rerun, so a rerun asks nothing again."""
    options = resources.settings.detections
    rare = rare_species if options.review_rare else set()
    if table.num_rows == 0 or not (rare or options.review_sample_share):
        return []
    candidates = review_candidates(table, rare, options.review_sample_share)
    return [(row, reason) for row, reason in candidates if resources.reviews.requested(id_of(row)) is None]


def open_reviews(wanted: list[tuple[dict, str]], resources: RunResources) -> None:
    """Each detection in a review run of its own. A request is stored first: if its run cannot be created,
    `birdflow review list` still shows it."""
    asked = resources.reviews.request(wanted)
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
                    idempotency_key=IDEMPOTENCY_PREFIX + id_of(row),
                    tags=["review", reason, row["listener_id"]],
                    state=Scheduled(),
                )
    except Exception as exc:  # the requests are stored; they wait in `birdflow review list`
        get_run_logger().warning(
            "could not open review runs (%s: %s); `birdflow review list` shows them", type(exc).__name__, exc
        )


def listen_links(clip_key: str, resources: RunResources) -> list[tuple[str, str]]:
    """Where a browser can play the clip: the archive's own link when it has one (S3, presigned), and the
    station's (the ingest API's /clips, signed); each valid clip_link_days (an S3 link 7 days at most)."""
    settings = resources.settings
    valid_s = int(settings.detections.clip_link_days * 86400)
    path = f"/{clip_key}.flac"
    station = signed_link(settings.station_url, path, link_key(settings.link_key_file), int(time.time()) + valid_s)
    archived = resources.archive.browser_link(clip_key + ".flac", valid_s)
    if archived is None:
        return [("Listen to the clip (FLAC)", station)]
    until = datetime.fromtimestamp(time.time() + min(valid_s, PRESIGNED_MAX_S), timezone.utc)
    return [
        (f"Listen to the clip (FLAC, from the archive until {until:%Y-%m-%d %H:%M} UTC)", archived),
        ("Listen to it from the station", station),
    ]


def review_media(row: dict[str, Any], resources: RunResources) -> tuple[bytes | None, list[tuple[str, str]]]:
    """(the spectrogram PNG, the links to the audio) of the detection's clip; (None, []) when it has none. An archive
    that cannot be reached costs the form its picture (the next form asked has it again), not the review."""
    if not row.get("clip_key"):
        return None, []
    try:
        spectrogram = resources.archive.fetch(row["clip_key"] + ".png")
    except Exception as exc:
        get_run_logger().warning("the clip's spectrogram could not be read (%s: %s)", type(exc).__name__, exc)
        spectrogram = None
    return spectrogram, listen_links(row["clip_key"], resources)


def asked_before() -> bool:
    """Whether this run has shown its form already (it is being resumed): its pause keys say so."""
    context = FlowRunContext.get()
    return bool(context and context.flow_run and context.flow_run.empirical_policy.pause_keys)


def end_decided_reviews(client: SyncPrefectClient, resources: RunResources) -> list[str]:
    """The station's review runs still waiting for a detection that has a verdict now, completed with it; returns
    the detection ids. One query per 200 waiting runs."""
    ended, offset = [], 0
    while True:
        waiting = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[REVIEW_FLOW])),
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[resources.settings.station_id])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
            ),
            limit=PAGE,
            offset=offset,
        )
        ended_here = 0
        for run in waiting:
            wanted = (run.idempotency_key or "").removeprefix(IDEMPOTENCY_PREFIX)
            given = resources.reviews.verdict_given(wanted) if wanted else None
            if given is not None:
                client.set_flow_run_state(
                    run.id, Completed(message=f"{given.verdict} by {given.reviewer} ({given.via})"), force=True
                )
                ended.append(wanted)
                ended_here += 1
        if len(waiting) < PAGE:
            return ended
        offset += len(waiting) - ended_here  # the ended ones left the list of waiting runs


@flow(name=REVIEW_FLOW, persist_result=False, log_prints=False)
def review_detection(detection: dict[str, Any], reason: str = "rare"):
    """Shows the detection and waits, suspended, for a verdict. A detection decided before its form was ever
    shown (on the command line) ends the run with that verdict; a form filled in later is the later verdict."""
    resources = run_resources()
    row = {**detection, "time": datetime.fromisoformat(detection["time"])}
    wanted = id_of(row)
    given = resources.reviews.verdict_given(wanted)
    if given is not None and not asked_before():
        return {"detection_id": wanted, "verdict": given.verdict, "species": given.scientific_name}
    spectrogram, links = review_media(row, resources)
    page = review_page(row, reason, spectrogram, links)
    if not has_artifacts(flow_run.id):  # the page once, not again each time the run is resumed
        create_markdown_artifact(page, description=f"review of detection {wanted}")
    problem = ""
    for attempt in range(ATTEMPTS):
        form = suspend_flow_run(
            wait_for_input=ReviewForm.with_initial_data(description=problem + page), key=f"verdict-{attempt}"
        )
        try:
            verdict = verdict_from(form.verdict, form.relabel_to, species_names(), form.reviewer or "prefect-ui", "ui")
        except ReviewError as exc:  # what was typed, shown as text (never as markdown)
            problem = f"**Not taken: {markdown_text(str(exc))}.** Give the verdict again.\n\n"
            continue
        take_verdict(resources, row, verdict)
        get_run_logger().info("%s: %s by %s", wanted, verdict.verdict, verdict.reviewer)
        return {"detection_id": wanted, "verdict": verdict.verdict, "species": verdict.scientific_name}
    raise ReviewError(f"no valid verdict in {ATTEMPTS} forms; review {wanted} with `birdflow review`")
