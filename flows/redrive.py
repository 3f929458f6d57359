"""Re-driving failed process-recording runs through Prefect's own states, and giving up on them.

A failed run is set to AwaitingRetry (Prefect's Scheduled state for a retry) at the time the policy
gives: the executor runs it when it is due, the UI shows when, and the state survives restarts. A run
that cannot succeed (Unprocessable) or has failed past its maximum age is given up: it is marked
Expired, its audio moves to the failed folder, and it is reported (log, metric, a Prefect artifact).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.actions import ArtifactCreate
from prefect.client.schemas.objects import FlowRun, State
from prefect.states import AwaitingRetry, Failed

from birdflow.core.recordings import RecordingInfo
from birdflow.core.redrive_policy import RedrivePolicy
from birdflow.flows.engine import one_line
from birdflow.flows.process_recording import UNPROCESSABLE
from birdflow.runtime import metrics
from birdflow.settings import Settings

log = logging.getLogger("birdflow.redrive")
EXPIRED = "Expired"  # name of the Failed state of a run given up after redrive_max_age_days
GIVEN_UP = {UNPROCESSABLE, EXPIRED}
REPORT_KEY = "given-up-recordings"


def policy(settings: Settings) -> RedrivePolicy:
    return RedrivePolicy(
        tuple(settings.unattended.redrive_delays_s), timedelta(days=settings.unattended.redrive_max_age_days)
    )


def redrive_or_give_up(
    client: SyncPrefectClient, flow_run: FlowRun, state: State, settings: Settings
) -> datetime | None:
    """Schedule the failed run's next attempt and return its time, or give the run up (None). A run that
    cannot succeed, or that a person cancelled, is given up at once."""
    now = datetime.now(timezone.utc)
    unusable = state.name not in GIVEN_UP and parameters_problem(flow_run)
    if unusable:  # the same parameters fail the same way every time (a run made by hand, say)
        state = Failed(name=UNPROCESSABLE, message=f"its parameters are not a recording: {unusable}"[:500])
        client.set_flow_run_state(flow_run.id, state, force=True)
    retryable = state.name not in GIVEN_UP and not state.is_cancelled()
    due = policy(settings).next_attempt(flow_run.run_count, flow_run.created or now, now) if retryable else None
    if due is not None:
        message = f"re-drive {flow_run.run_count} after: {state.message or state.name}"[:500]
        client.set_flow_run_state(flow_run.id, AwaitingRetry(scheduled_time=due, message=message))
        log.info("flow run %s failed (%s); re-driven at %s", flow_run.name, state.message, f"{due:%H:%M:%S}")
        return due
    give_up(client, flow_run, state, settings)
    return None


def parameters_problem(flow_run: FlowRun) -> str | None:
    """What makes a run's `recording` parameter no recording (a file_name with a path in it...), or None."""
    try:
        RecordingInfo.model_validate(flow_run.parameters.get("recording"))
    except ValueError as exc:
        return one_line(str(exc))
    return None


def give_up(client: SyncPrefectClient, flow_run: FlowRun, state: State, settings: Settings) -> None:
    """Mark the run given up, keep its audio in the failed folder, and say so where people look."""
    if state.name == UNPROCESSABLE:
        reason = "unprocessable"
    elif state.is_cancelled():
        reason = "cancelled"
    else:
        reason = "expired"
        now = datetime.now(timezone.utc)
        age = now - (flow_run.created or now)
        state = Failed(
            name=EXPIRED, message=f"still failing after {age.days} d {age.seconds // 3600} h: {state.message}"[:500]
        )
        client.set_flow_run_state(flow_run.id, state, force=True)
    recording = flow_run.parameters.get("recording") or {}
    kept = keep_audio(recording, settings)
    metrics.RECORDINGS_GIVEN_UP.labels(settings.station_id, reason).inc()
    log.warning("flow run %s given up (%s): %s; audio kept in %s", flow_run.name, reason, state.message, kept)
    client.create_artifact(
        ArtifactCreate(
            key=REPORT_KEY,
            type="markdown",
            flow_run_id=flow_run.id,
            description=f"A recording birdflow gave up on ({reason})",
            data=(
                f"**{flow_run.name}** given up ({reason}) after {flow_run.run_count} attempt(s).\n\n"
                f"- recording: `{recording.get('recording_id', '?')}`\n- why: {state.message}\n"
                f"- audio kept in: `{kept}`\n\nFix the cause, then rerun it from this page or "
                f"`birdflow backfill {settings.failed_dir}`."
            ),
        )
    )


def keep_audio(recording: dict, settings: Settings) -> Path | None:
    """Move a given-up recording (audio and metadata) from the recordings folder to the failed folder."""
    if not recording.get("file_name") or recording.get("source_path"):
        return None
    try:
        info = RecordingInfo.model_validate(recording)
    except ValueError:  # parameters no recording of this station has (a run made by hand): nothing to keep
        return None
    audio = settings.recordings_dir / info.file_name
    if not audio.is_file():
        return None
    settings.failed_dir.mkdir(parents=True, exist_ok=True)
    sidecar = audio.with_suffix(".json")
    if sidecar.is_file():
        sidecar.replace(settings.failed_dir / sidecar.name)
    audio.replace(settings.failed_dir / audio.name)
    return settings.failed_dir / audio.name
