"""Re-drive of failed recording runs: the pure policy, and Prefect's states on a real server."""

from __future__ import annotations

import re
import time
from datetime import datetime, timedelta, timezone

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowFilter, FlowFilterName
from prefect.states import Failed
from prometheus_client import REGISTRY

from birdflow.core.recordings import RecordingStore
from birdflow.core.redrive_policy import RedrivePolicy
from birdflow.settings import Settings

UTC = timezone.utc


def test_delays_grow_then_the_last_repeats_until_the_maximum_age():
    policy = RedrivePolicy((60, 120, 300), timedelta(days=7))
    arrived = datetime(2025, 6, 1, tzinfo=UTC)
    failed = arrived + timedelta(minutes=3)
    waits = [(policy.next_attempt(n, arrived, failed) - failed).total_seconds() for n in (1, 2, 3, 4, 40)]
    assert waits == [60, 120, 300, 300, 300]
    assert policy.next_attempt(0, arrived, failed) - failed == timedelta(seconds=60)  # never ran: first delay
    assert policy.next_attempt(5, arrived, arrived + timedelta(days=7)) is None


@pytest.fixture
def station(prefect_server, tmp_path):
    """A station's deployment on the test server, and a recording published in its folder."""
    from birdflow.deployments.registration import register_deployments
    from tests.conftest import SAMPLE_48K, require_sample

    settings = Settings(
        station_id=f"redrive-{time.monotonic_ns()}", data_dir=tmp_path / "data", redrive_delays_s=[30, 90]
    )
    deployment_id = register_deployments(settings).recordings
    store = RecordingStore(settings.partial_dir, settings.recordings_dir, settings.station_id)
    partial = store.new_upload_partial(".wav")
    partial.write_bytes(require_sample(SAMPLE_48K).read_bytes())
    info = store.publish(
        partial,
        listener_id="mic1",
        start_time=datetime(2025, 6, 1, tzinfo=UTC),
        duration_s=10,
        sample_rate=48000,
        channels=1,
        gaps=0,
        source="upload",
    )
    with get_client(sync_client=True) as client:
        flow_run = client.create_flow_run_from_deployment(
            deployment_id, parameters={"recording": info.model_dump(mode="json")}
        )
        client.set_flow_run_state(flow_run.id, Failed(message="EndpointConnectionError: S3 unreachable"), force=True)
        yield settings, client, client.read_flow_run(flow_run.id), info


def test_a_failed_run_is_scheduled_again_in_prefect(station):
    from birdflow.flows.redrive import redrive_or_give_up

    settings, client, flow_run, info = station
    due = redrive_or_give_up(client, flow_run, flow_run.state, settings)
    assert due is not None
    assert 25 < (due - datetime.now(UTC)).total_seconds() <= 30
    state = client.read_flow_run(flow_run.id).state
    assert (state.type.value, state.name) == ("SCHEDULED", "AwaitingRetry")
    assert state.state_details.scheduled_time == due
    assert "S3 unreachable" in state.message
    assert (settings.recordings_dir / info.file_name).exists()  # its audio waits where it was


def test_a_run_failing_past_its_maximum_age_is_given_up_and_reported(station):
    from birdflow.flows.redrive import EXPIRED, REPORT_KEY, redrive_or_give_up

    settings, client, flow_run, info = station
    settings = settings.model_copy(
        update={"unattended": settings.unattended.model_copy(update={"redrive_max_age_days": 1e-9})}
    )
    labels = {"station": settings.station_id, "reason": "expired"}
    assert redrive_or_give_up(client, flow_run, flow_run.state, settings) is None
    state = client.read_flow_run(flow_run.id).state
    assert (state.type.value, state.name) == ("FAILED", EXPIRED) and "S3 unreachable" in state.message
    assert not (settings.recordings_dir / info.file_name).exists()
    assert (settings.failed_dir / info.file_name).read_bytes()[:4] == b"RIFF"
    assert (settings.failed_dir / f"{info.recording_id}.json").exists()
    assert REGISTRY.get_sample_value("birdflow_recordings_given_up_total", labels) == 1.0
    artifacts = client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]))
    )
    assert [artifact.key for artifact in artifacts] == [REPORT_KEY]
    assert info.recording_id in artifacts[0].data


def test_the_maintenance_run_re_drives_what_nothing_re_drove(station, monkeypatch):
    from birdflow.flows import maintenance
    from birdflow.flows.run_resources import use_run_resources

    settings, client, flow_run, info = station
    use_run_resources(settings)
    assert maintenance.maintenance()["redrive"] == {
        "redriven": 0,
        "given_up": 0,
    }  # it just failed: its executor's
    monkeypatch.setattr(maintenance, "SETTLE_S", 0.0)  # as if a minute had passed without a re-drive
    summary = maintenance.maintenance()
    assert summary["redrive"] == {"redriven": 1, "given_up": 0}
    assert client.read_flow_run(flow_run.id).state.name == "AwaitingRetry"
    assert maintenance.maintenance()["redrive"] == {"redriven": 0, "given_up": 0}  # once is enough
    names = [
        run.name for run in client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["maintenance"])))
    ]
    assert names and all(re.fullmatch(r"maintenance-\d{8}T\d{6}Z", name) for name in names), names


def test_a_run_whose_parameters_are_no_recording_is_given_up_as_unprocessable_at_once(station):
    """Prefect fails such a run before it starts (its parameters do not validate): no re-drive can help."""
    from birdflow.flows.process_recording import UNPROCESSABLE
    from birdflow.flows.redrive import redrive_or_give_up

    settings, client, flow_run, info = station
    bad = {**info.model_dump(mode="json"), "file_name": "../../etc/passwd"}
    made_by_hand = client.create_flow_run_from_deployment(flow_run.deployment_id, parameters={"recording": bad})
    client.set_flow_run_state(made_by_hand.id, Failed(message="Validation of flow parameters failed"), force=True)
    made_by_hand = client.read_flow_run(made_by_hand.id)
    assert redrive_or_give_up(client, made_by_hand, made_by_hand.state, settings) is None
    state = client.read_flow_run(made_by_hand.id).state
    assert (state.type.value, state.name) == ("FAILED", UNPROCESSABLE) and "must be a plain name" in state.message
    assert (settings.recordings_dir / info.file_name).exists()  # nothing of the station's touched
