"""A station that keeps its own run history (its recordings' runs on its embedded Prefect server) and its fleet's
central Prefect (setting central_api_url): `birdflow relay`, a process whose Prefect API is the central one, sends
the central server what is fleet-wide and nothing per recording.

- the rare-species events (`birdflow.detection.rare`), as they were emitted on the station, so the central
  server's automations notify as they do on one box; queued on disk until the central server took them;
- once an hour has closed (a quiet one too), one `station-hour` run of the station's `station-hour/<station>`
  deployment on the central server, whose artifact says what was heard (species, counts, listeners), the rare
  sightings with links to the station's own run pages, and how the station is (backlog, disk, silent listeners);
- `birdflow.detection.confirmed`, when a rare sighting it sent and another station's of the same species on the
  central server confirm each other (flows/announce.py). Each sent sighting is matched CONFIRM_CHECKS_S after it
  was sent: first once the central server has stored what other stations sent meanwhile, then again should it
  have been slow to.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from datetime import datetime, timezone
from typing import cast
from uuid import UUID

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import SyncPrefectClient
from prefect.deployments.runner import EntrypointType, RunnerDeployment

from birdflow.core.central_link import CentralLink, hour_summary
from birdflow.core.rarity import RARE_EVENT
from birdflow.core.recordings import RecordingStore
from birdflow.flows.announce import confirm_on_server
from birdflow.flows.backfill import known_listeners
from birdflow.flows.engine import create_running, engine_context, run_in_process
from birdflow.flows.run_resources import run_resources, use_run_resources
from birdflow.settings import Settings

SUMMARY_FLOW = "station-hour"
EVENTS_PER_REQUEST = 200
# longer than the central server takes to store an event it was sent (Prefect's event persister: 5 s)
# after sending a rare sighting, when it is matched (seconds): the first longer than the central server takes to
# store an event (Prefect's event persister flushes every 5 s), the others for a server slow to
CONFIRM_CHECKS_S = (10.0, 30.0, 120.0)
CONFIRM_GIVE_UP_S = 3600.0  # a sighting the central server could not match for this long (away, or refusing it)
log = logging.getLogger("birdflow.relay")


@flow(name=SUMMARY_FLOW, persist_result=False, log_prints=False)
def station_hour(hour: int) -> dict:
    """An hour of the station, as the central server shows it (`hour`: its start, epoch seconds)."""
    resources = run_resources()
    settings = resources.settings
    link = resources.central_link
    counts = resources.species.hour_table(hour, settings.station_id)
    rare = link.sightings(hour, settings.station_id) if link else []
    backlog = len(RecordingStore(settings.partial_dir, settings.recordings_dir, settings.station_id).pending())
    usage = shutil.disk_usage(settings.data_dir)
    listeners = (known_listeners(settings, resources.ledger), resources.ledger.listeners_heard(hour))
    create_markdown_artifact(
        hour_summary(settings.station_id, hour, counts, rare, listeners, backlog, usage.free / usage.total),
        description=f"station {settings.station_id}, hour {datetime.fromtimestamp(hour, timezone.utc):%Y-%m-%d %H}:00",
    )
    return {"detections": sum(counts.column("detections").to_pylist()), "rare": len(rare), "backlog": backlog}


class Relay:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.resources = use_run_resources(settings)
        self.link = cast(CentralLink, self.resources.central_link)
        self.to_confirm: list[tuple[float, float, dict]] = []  # (when sent, when due, the rare event sent)
        self.confirm_checks_s: tuple[float, ...] = CONFIRM_CHECKS_S
        self.store = RecordingStore(settings.partial_dir, settings.recordings_dir, settings.station_id)

    def register(self) -> UUID:
        """The station's summary deployment on the central server (in its work pool, as its other deployments)."""
        deployment = cast(
            RunnerDeployment,
            station_hour.to_deployment(
                name=self.settings.station_id,
                tags=["birdflow", "station-hour", self.settings.station_id],
                description=f"An hour of station {self.settings.station_id}, summarised by the station itself.",
                entrypoint_type=EntrypointType.MODULE_PATH,
            ),
        )
        return cast(UUID, deployment.apply(work_pool_name=self.settings.prefect.work_pool or None))

    def run_forever(self, stop: threading.Event, interval_s: float = 5.0) -> None:
        deployment = self.register()
        log.info("relay of station %s to %s ready", self.settings.station_id, self.settings.prefect.central_api_url)
        with engine_context() as client:
            steps = (self.send_events, self.confirm_due, lambda client: self.summarize(client, deployment))
            while not stop.wait(interval_s):
                for step in steps:  # one failing (a sighting the server refuses) holds up none of the others
                    try:
                        step(client)
                    except Exception as exc:  # the central server away: everything waits, tried again
                        log.warning("central Prefect: %s; tried again in %.0f s", exc, interval_s)

    def send_events(self, client: SyncPrefectClient) -> int:
        """Queued events to the central server, oldest first, each removed once it took them."""
        sent = 0
        while queued := self.link.events.head(EVENTS_PER_REQUEST):
            response = client.request("POST", "/events", json=[json.loads(item.message.payload) for item in queued])
            response.raise_for_status()
            self.link.events.remove(item.id for item in queued)
            sent += len(queued)
            if self.settings.detections.rare_confirm_window_s:
                now = time.monotonic()
                events = [json.loads(item.message.payload) for item in queued]
                self.to_confirm += [
                    (now, now + self.confirm_checks_s[0], event) for event in events if event["event"] == RARE_EVENT
                ]
        return sent

    def confirm_due(self, client: SyncPrefectClient) -> list[dict]:
        """The sent sightings due to be matched, matched against the central server's; the confirmed events sent.
        One not confirmed is matched again at its next check, if any."""
        now = time.monotonic()
        self.to_confirm = [item for item in self.to_confirm if item[0] > now - CONFIRM_GIVE_UP_S]
        confirmed = []
        for sent, _, event in [item for item in self.to_confirm if item[1] <= now]:
            found = confirm_on_server(client, event, self.settings.detections)
            self.to_confirm = [item for item in self.to_confirm if item[2] is not event]
            later = [sent + after for after in self.confirm_checks_s if sent + after > now]
            if found is None and later:
                self.to_confirm.append((sent, later[0], event))
            elif found is not None:
                log.info(
                    "%s confirmed by stations %s",
                    found["resource"]["prefect.resource.name"],
                    found["payload"]["stations"],
                )
                confirmed.append(found)
        return confirmed

    def summarize(self, client: SyncPrefectClient, deployment: UUID, now: float | None = None) -> int:
        """A station-hour run for each closed hour not summarised yet (again when late recordings changed it), once
        none of its recordings waits to be analysed."""
        settings = self.settings
        now = time.time() if now is None else now
        settle = settings.detections.hourly_settle_s
        closed = self.resources.species.closed_hours(now, settle)
        waiting = [path.name for path in self.store.pending()]
        due = self.link.to_summarize(closed, settings.station_id, now, settle, waiting)
        for hour, station, version in due:
            start = datetime.fromtimestamp(hour, timezone.utc)
            flow_run, created = create_running(
                client,
                deployment,
                parameters={"hour": hour},
                name=f"{station} {start:%Y-%m-%d %H}:00",
                tags=["station-hour", station],
                idempotency_key=f"station-hour-{station}-{hour}-{version}",
            )
            if flow_run.state is None or not flow_run.state.is_final():  # a run created now is Running
                run_in_process(station_hour, flow_run, created_running=created)
            self.link.summarized(hour, station, version)
        return len(due)
