"""What a run tells people: the Prefect event of each rare sighting (automations turn it into a
notification) and the run's table artifact of what it heard."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from urllib.parse import urlencode

import pyarrow as pa
from prefect import get_client, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.client.orchestration import SyncPrefectClient
from prefect.events import Event, emit_event
from prefect.runtime import flow_run
from prefect.settings import get_current_settings

from birdflow.core.central_link import CentralLink, confirmation
from birdflow.core.detections import artifact_rows, summary
from birdflow.core.rarity import RARE_EVENT, RARE_IN_RECORDING_EVENT, RareSighting
from birdflow.core.retention import Purged
from birdflow.settings.sections import DetectionSettings

PURGED_EVENT = "birdflow.archive.purged"  # archived audio deleted (automations can notify on it)
EVENT_IDS = uuid.UUID("0d3c1d2e-3b7a-5c8e-9f21-6a4b8c0e1f57")  # the namespace of the rare events' ids


def rare_event_fields(sighting: RareSighting, archive_key: str, run_url: str | None) -> dict:
    """The event's resource (the recording, labelled with station and listener), related resources and payload."""
    return {
        "event": RARE_EVENT,
        "resource": {
            "prefect.resource.id": f"birdflow.recording.{sighting.recording_id}",
            "prefect.resource.name": sighting.recording_id,
            "birdflow.station": sighting.station_id,
            "birdflow.listener": sighting.listener_id,
            "birdflow.species": sighting.scientific_name,
        },
        "related": [
            {"prefect.resource.id": f"birdflow.station.{sighting.station_id}", "prefect.resource.role": "station"},
            {
                "prefect.resource.id": f"birdflow.listener.{sighting.station_id}.{sighting.listener_id}",
                "prefect.resource.role": "listener",
            },
        ],
        "payload": {
            "scientific_name": sighting.scientific_name,
            "common_name": sighting.common_name,
            "confidence": sighting.confidence,
            "time": sighting.time,
            "station_id": sighting.station_id,
            "listener_id": sighting.listener_id,
            "watched": sighting.watched,
            "archive_key": archive_key,
            "run_url": run_url or "",
        },
    }


def best_clip_links(rows: list[dict], links: dict[str, str]) -> dict[str, str]:
    """Scientific name -> the link to the species' most confident clip in the recording (`links`: clip key ->
    link)."""
    best: dict[str, dict] = {}
    for row in rows:
        name = row["scientific_name"]
        if row["clip_key"] in links and (name not in best or row["confidence"] > best[name]["confidence"]):
            best[name] = row
    return {name: links[row["clip_key"]] for name, row in best.items()}


def recording_event_fields(
    sightings: list[RareSighting], run_url: str | None, place: tuple[float | None, float | None], clips: dict[str, str]
) -> dict:
    """One event for the recording, listing its rare species (a notification names them all at once), with the
    station's coordinates, the run's link and each species' clip link (`clips`: scientific name -> link)."""
    first = min(sightings, key=lambda sighting: sighting.time)
    ordered = sorted(sightings, key=lambda sighting: -sighting.confidence)
    species = [
        {
            "scientific_name": sighting.scientific_name,
            "common_name": sighting.common_name,
            "confidence": sighting.confidence,
            "time": sighting.time,
            "watched": sighting.watched,
            "clip_url": clips.get(sighting.scientific_name, ""),
        }
        for sighting in ordered
    ]
    return {
        "event": RARE_IN_RECORDING_EVENT,
        "resource": {
            "prefect.resource.id": f"birdflow.recording.{first.recording_id}",
            "prefect.resource.name": first.recording_id,
            "birdflow.station": first.station_id,
            "birdflow.listener": first.listener_id,
        },
        "related": [
            {"prefect.resource.id": f"birdflow.station.{first.station_id}", "prefect.resource.role": "station"}
        ],
        "payload": {
            "station_id": first.station_id,
            "listener_id": first.listener_id,
            "recording_id": first.recording_id,
            "time": first.time,
            "latitude": place[0],
            "longitude": place[1],
            "run_url": run_url or "",
            "species": species,
            "common_names": ", ".join(sighting.common_name for sighting in ordered),
        },
    }


def purged_event_fields(item: Purged, station_id: str) -> dict:
    return {
        "event": PURGED_EVENT,
        "resource": {
            "prefect.resource.id": f"birdflow.recording.{item.recording_id}",
            "prefect.resource.name": item.recording_id,
            "birdflow.station": station_id,
        },
        "related": [{"prefect.resource.id": f"birdflow.station.{station_id}", "prefect.resource.role": "station"}],
        "payload": {"reason": item.reason, "path": item.path, "size": item.size},
    }


def announce_purged(purged: list[Purged], station_id: str) -> None:
    for item in purged:
        emit_event(**purged_event_fields(item, station_id))


def ui_link(path: str) -> str | None:
    """An address of the Prefect UI (public_ui_url, else Prefect's own) as a person opens it: through its login page
    when the server asks for a password, since Prefect's UI answers a run page opened without one with "Page not
    found" (its login page takes them there once logged in). None without a UI."""
    settings = get_current_settings()
    if not settings.ui_url:
        return None
    base = settings.ui_url.rstrip("/")
    return f"{base}/login?{urlencode({'redirect': path})}" if settings.api.auth_string else f"{base}{path}"


def run_page() -> str | None:
    """This run's page in the Prefect UI, as a person opens it (ui_link)."""
    return ui_link(f"/runs/flow-run/{flow_run.id}") if flow_run.id else None


def announce_rare(
    sightings: list[RareSighting],
    archive_key: str,
    confirm: DetectionSettings | None = None,
    central: CentralLink | None = None,
    place: tuple[float | None, float | None] = (None, None),
    clips: dict[str, str] | None = None,
) -> None:
    """On the station's Prefect, and queued for the fleet's central one when the station has one (whose relay then
    looks for confirmation there), and one event for the recording listing them all (what notifications are sent
    from). With `confirm` (the Prefect server stores its event feed: a central one of every
    run, or a station's own with prefect_events_enabled), the sighting is matched on the station's Prefect."""
    run_url = run_page()
    if not sightings:
        return
    recording = recording_event_fields(sightings, run_url, place, clips or {})
    per_species = [rare_event_fields(sighting, archive_key, run_url) for sighting in sightings]
    events = sent_for_certain([recording, *per_species])
    if central is not None:
        central.event(recording, once_for=f"{sightings[0].recording_id}:rare")
    for sighting, fields, event in zip(sightings, per_species, events[1:]):
        if central is not None:
            central.rare(fields, once_for=f"{sighting.recording_id}:{sighting.scientific_name}")
        elif confirm is not None and confirm.rare_confirm_window_s:
            try:
                with get_client(sync_client=True) as client:
                    confirm_on_server(client, event.model_dump(mode="json"), confirm)
            except Exception as exc:  # the sighting is announced either way; a retry would announce it twice
                get_run_logger().warning("could not look for a confirmation of %s: %s", sighting.scientific_name, exc)


def sent_for_certain(fields: list[dict]) -> list[Event]:
    """The events, posted to the Prefect API and acknowledged. emit_event hands them to a background worker that
    drops what it cannot deliver (a server being restarted: a missed notification); here a failure raises, so the
    run's retry announces again (the species record marks a recording announced only afterwards). Each event's id
    comes from its recording and species, so an event sent twice is one event to the server's feed."""
    now = datetime.now(timezone.utc)
    run = (
        [{"prefect.resource.id": f"prefect.flow-run.{flow_run.id}", "prefect.resource.role": "flow-run"}]
        if flow_run.id
        else []
    )
    events = [
        Event(
            **{**item, "related": [*item.get("related", []), *run]},
            occurred=now,
            id=uuid.uuid5(
                EVENT_IDS,
                f"{item['event']}:{item['resource']['prefect.resource.id']}:"
                f"{item['resource'].get('birdflow.species', '')}",
            ),
        )
        for item in fields
    ]
    with get_client(sync_client=True) as client:
        client.request("POST", "/events", json=[event.model_dump(mode="json") for event in events])
    return events


def confirm_on_server(client: SyncPrefectClient, sighting: dict, rules: DetectionSettings) -> dict | None:
    """Matches a rare sighting (an event the server has, or is about to have) against the rare sightings of its
    species the server holds from the window before it, and sends the confirmed event when two stations (or
    listeners) heard it. Returns that event."""
    since = datetime.fromisoformat(sighting["payload"]["time"]) - timedelta(seconds=rules.rare_confirm_window_s)
    query = {
        "event": {"name": [RARE_EVENT]},
        "occurred": {"since": since.isoformat()},
        "resource": {"labels": {"birdflow.species": sighting["payload"]["scientific_name"]}},
    }
    response = client.request("POST", "/events/filter", json={"filter": query, "limit": 50})
    response.raise_for_status()
    confirmed = confirmation(sighting, response.json()["events"], rules.rare_confirm_window_s, rules.confirm_by)
    if confirmed is not None:
        client.request("POST", "/events", json=[confirmed]).raise_for_status()
    return confirmed


def show_detections(table: pa.Table, rare_species: set[str], link: Callable[[str], str]) -> None:
    """The run's table artifact (a run that heard nothing gets none: one API call saved per quiet recording).
    A rerun (the UI's, or a re-drive) that finds its first attempt's table, which the same audio makes again,
    adds none."""
    if table.num_rows and not (flow_run.run_count > 1 and has_artifacts(flow_run.id)):
        create_table_artifact(artifact_rows(table, rare_species, link), description=summary(table))


def has_artifacts(run_id) -> bool:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return bool(
            client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])), limit=1
            )
        )
