"""What the flow gives up and what it retries (birdflow/core/errors.py): only the audio and the run's parameters
are a verdict on a recording; a damaged state file or a setting met halfway through a run is retried, and said."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import cast
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import State

from birdflow.core.recordings import RecordingInfo, RecordingStore
from birdflow.settings import Settings
from tests.conftest import SAMPLE_48K, require_sample

START = datetime(2025, 6, 1, 5, 30, tzinfo=timezone.utc)


def published(settings: Settings, listener_id: str = "mic1") -> RecordingInfo:
    """The 10 s sample (birds in it) published in the station's recordings folder, as an upload would."""
    store = RecordingStore(settings.partial_dir, settings.recordings_dir, settings.station_id)
    partial = store.new_upload_partial(".wav")
    partial.write_bytes(require_sample(SAMPLE_48K).read_bytes())
    return store.publish(
        partial,
        listener_id=listener_id,
        start_time=START,
        duration_s=10,
        sample_rate=48000,
        channels=1,
        gaps=0,
        source="upload",
    )


def run_and_redrive(settings: Settings, info: RecordingInfo) -> tuple[State, datetime | None]:
    """The recording's run, then what the station's maintenance decides about its failure."""
    from birdflow.flows.process_recording import process_recording
    from birdflow.flows.redrive import redrive_or_give_up

    state = cast(State, process_recording(info, return_state=True))
    assert state.is_failed(), state
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(cast(UUID, state.state_details.flow_run_id))
        return state, redrive_or_give_up(client, flow_run, state, settings)


@pytest.fixture
def station(prefect_server, tmp_path, monkeypatch):
    from birdflow.flows import run_resources

    monkeypatch.setattr(run_resources, "_current", None)  # this test's resources go with it

    def made(**values) -> Settings:
        settings = Settings(station_id=f"fail-{time.monotonic_ns()}", data_dir=tmp_path / "data", **values)
        run_resources.use_run_resources(settings)
        return settings

    return made


def test_a_corrupt_hourly_file_leaves_the_recording_retried_and_names_the_file(station):
    from birdflow.flows.process_recording import UNPROCESSABLE, process_recording
    from birdflow.flows.run_resources import use_run_resources

    settings = station()
    info = published(settings)
    corrupt = settings.species_hourly_dir / f"{START:%Y/%m/%d/%H}.parquet"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"PAR1 not a parquet file at all")
    state, due = run_and_redrive(settings, info)
    assert state.name != UNPROCESSABLE and "StateFileError" in state.message and str(corrupt) in state.message
    assert due is not None  # re-driven, not given up
    assert (settings.recordings_dir / info.file_name).is_file() and not settings.failed_dir.exists()
    # once the file is restored (here: removed), the recording goes through
    corrupt.unlink()
    use_run_resources(settings)
    assert cast(State, process_recording(info, return_state=True)).is_completed()
    assert not (settings.recordings_dir / info.file_name).exists()


def test_a_settings_error_while_the_model_loads_leaves_the_recording_retried(station):
    from birdflow.flows.process_recording import UNPROCESSABLE

    settings = station(include_species=["Avis nonexistens"])  # checked against the model's labels when it loads
    info = published(settings)
    state, due = run_and_redrive(settings, info)
    assert state.name != UNPROCESSABLE and "SettingsError" in state.message and "include_species" in state.message
    assert due is not None
    assert (settings.recordings_dir / info.file_name).is_file() and not settings.failed_dir.exists()


def test_audio_that_does_not_decode_is_given_up_into_the_failed_folder(station):
    from birdflow.flows.process_recording import UNPROCESSABLE

    settings = station()
    info = published(settings)
    (settings.recordings_dir / info.file_name).write_bytes(b"RIFF\x00\x00\x00\x00WAVEbroken")
    state, due = run_and_redrive(settings, info)
    assert state.name == UNPROCESSABLE and "AudioError" in state.message
    assert due is None and (settings.failed_dir / info.file_name).is_file()
