"""The flow's retry and cache policies, and what a run may read."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import cast

import pytest
from botocore.exceptions import EndpointConnectionError
from prefect.client.schemas.objects import State
from prefect.states import Failed
from prometheus_client import REGISTRY

from birdflow.core.analysis import AnalysisParams
from birdflow.core.archive import ArchiveError
from birdflow.core.audio import AudioError
from birdflow.core.recordings import RecordingInfo
from birdflow.flows.process_recording import MissingAudio, analysis_cache_key, worth_retrying
from tests.builders import recording_info


def failed_with(exc: BaseException) -> bool:
    return worth_retrying(None, None, Failed(data=exc))


def test_io_failures_are_retried_and_bad_audio_is_not():
    assert failed_with(OSError("disk busy"))
    assert failed_with(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert failed_with(ArchiveError("upload did not match"))
    assert not failed_with(AudioError("cannot decode audio"))
    assert failed_with(ValueError("a library's own error: not a verdict on the audio"))
    assert not failed_with(MissingAudio("archived copy does not match the content hash"))


def recording(content_hash: str, start: datetime) -> RecordingInfo:
    return recording_info(start_time=start, content_hash=content_hash)


def test_analysis_cache_key_follows_content_parameters_and_range_week():
    june, december = datetime(2025, 6, 1, tzinfo=timezone.utc), datetime(2025, 12, 1, tzinfo=timezone.utc)
    plain = AnalysisParams()
    ranged = AnalysisParams(latitude=42.0, longitude=-76.0)
    key = analysis_cache_key(recording("a" * 64, june), plain)
    assert key == analysis_cache_key(recording("a" * 64, june), AnalysisParams())  # re-sent audio: same key
    assert key != analysis_cache_key(recording("b" * 64, june), plain)
    assert key != analysis_cache_key(recording("a" * 64, june), AnalysisParams(min_confidence=0.5))
    # without a range filter the date does not matter; with one, the week does
    assert key == analysis_cache_key(recording("a" * 64, december), plain)
    assert analysis_cache_key(recording("a" * 64, june), ranged) != analysis_cache_key(
        recording("a" * 64, december), ranged
    )


@pytest.mark.parametrize(
    "field, value", [("file_name", "../../etc/x.wav"), ("listener_id", "a/b"), ("recording_id", "x\ny")]
)
def test_a_recording_names_no_other_path(field, value):
    good = recording("ab" * 32, datetime(2025, 6, 1, tzinfo=timezone.utc)).model_dump()
    with pytest.raises(ValueError, match="plain name"):
        RecordingInfo.model_validate({**good, field: value})


def test_a_run_whose_source_lies_outside_the_allowed_folders_fails_at_once(
    prefect_server, tmp_path, sample_48k, monkeypatch
):
    """What a caller of the Prefect API could try: point a run at any WAV on the station."""
    import shutil

    from birdflow.flows import run_resources
    from birdflow.flows.process_recording import UNPROCESSABLE, process_recording
    from birdflow.flows.run_resources import use_run_resources
    from birdflow.settings import Settings

    monkeypatch.setattr(run_resources, "_current", None)  # this test's resources go with it
    settings = Settings(station_id="confined", data_dir=tmp_path / "data", backfill_roots=[tmp_path / "allowed"])
    use_run_resources(settings)
    outside = tmp_path / "private" / "mic1_20250601T000000Z.wav"
    outside.parent.mkdir()
    shutil.copy(sample_48k, outside)
    (tmp_path / "allowed").mkdir()
    (tmp_path / "allowed" / "escape.wav").symlink_to(outside)  # a link out of an allowed folder is outside too
    refused = lambda: REGISTRY.get_sample_value("birdflow_sources_refused_total", {"station": "confined"}) or 0  # noqa: E731
    for source in (
        outside,
        tmp_path / "allowed" / "escape.wav",
        settings.recordings_dir / ".." / ".." / "private" / outside.name,
    ):
        before = refused()
        info = recording("cd" * 32, datetime(2025, 6, 1, tzinfo=timezone.utc)).model_copy(
            update={"source_path": str(source)}
        )
        state = cast(State, process_recording(info, return_state=True))
        assert state.is_failed() and state.name == UNPROCESSABLE and "backfill_roots" in state.message, source
        assert refused() == before + 1
    assert not settings.local_archive_dir.exists() and outside.read_bytes() == sample_48k.read_bytes()


def run_logs_and_artifacts(flow_run_id, expected_line: str | None = None) -> tuple[list[str], list]:
    """The run's log lines, once one holds `expected_line` (they reach the server in batches), and its artifacts."""
    import time

    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        for _ in range(100):  # logs reach the server in batches, every 2 s
            logs = [
                log.message
                for log in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            ]
            if expected_line is None or any(expected_line in line for line in logs):
                break
            time.sleep(0.2)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return logs, artifacts


def test_a_run_shows_what_it_heard_and_a_species_is_rare_only_the_first_time(
    prefect_server, tmp_path, sample_48k, monkeypatch
):
    import shutil

    from birdflow.core.recordings import describe_audio_file
    from birdflow.flows import run_resources
    from birdflow.flows.process_recording import process_recording
    from birdflow.flows.run_resources import use_run_resources
    from birdflow.settings import Settings

    monkeypatch.setattr(run_resources, "_current", None)
    settings = Settings(station_id="heard", data_dir=tmp_path / "data")
    use_run_resources(settings)
    settings.recordings_dir.mkdir(parents=True)
    results = []
    for listener in ("mic1", "mic2"):  # the same audio from two listeners: two recordings of the same species
        source = tmp_path / f"{listener}_20250601T053000Z.wav"
        shutil.copy(sample_48k, source)
        info = describe_audio_file(source, "heard", "upload")
        shutil.copy(source, settings.recordings_dir / info.file_name)
        state = process_recording(info, return_state=True)
        assert state.is_completed()
        logs, artifacts = run_logs_and_artifacts(state.state_details.flow_run_id, " detection")
        results.append((state.result(), logs, artifacts))
    (first, first_logs, [first_artifact]), (second, second_logs, [second_artifact]) = results
    assert (first["rare"], second["rare"]) == (1, 0)
    assert any(
        line.startswith(f"{first['detections']} detection") and "American Goldfinch" in line for line in first_logs
    ), first_logs
    import json

    rows = json.loads(first_artifact.data) if isinstance(first_artifact.data, str) else first_artifact.data
    assert first_artifact.type == "table" and len(rows) == first["detections"]
    assert rows[0]["species"] == "American Goldfinch (Spinus tristis)" and rows[0]["rare"] == "rare"
    assert "American Goldfinch" in first_artifact.description
    second_rows = json.loads(second_artifact.data) if isinstance(second_artifact.data, str) else second_artifact.data
    assert {row["rare"] for row in second_rows} == {""}
    # the closed hour's counts go to the sinks once, per listener and species
    from birdflow.core.sinks import read_hour
    from birdflow.flows.maintenance import write_hourly_counts

    assert write_hourly_counts.fn(settings)["hours_written"] == 1
    hour = read_hour(settings.species_hourly_dir, datetime(2025, 6, 1, 5, tzinfo=timezone.utc))
    assert [(r["listener_id"], r["common_name"], r["detections"]) for r in hour.to_pylist()] == [
        ("mic1", "American Goldfinch", first["detections"]),
        ("mic2", "American Goldfinch", second["detections"]),
    ]
    assert write_hourly_counts.fn(settings)["hours_written"] == 0  # written: not again until it changes


@pytest.fixture
def birds_then_speech(tmp_path, sample_48k):
    """10 s of the field recording (a goldfinch), then a woman's voice from espeak-ng (BirdNET: Human vocal)."""
    import shutil
    import subprocess

    import numpy as np
    import soundfile

    from birdflow.core.audio import decode

    if not shutil.which("espeak-ng"):
        pytest.skip("espeak-ng is not installed (Debian: apt install espeak-ng)")
    speech = tmp_path / "speech.wav"
    subprocess.run(
        [
            "espeak-ng",
            "-v",
            "en+f3",
            "-s",
            "140",
            "-a",
            "180",
            "-w",
            str(speech),
            "Good morning. I am walking along the river with my dog. We can hear birds singing all around us today.",
        ],
        check=True,
        timeout=60,
    )
    audio = np.concatenate([decode(sample_48k), decode(speech)])
    path = tmp_path / "mic1_20250601T053000Z.wav"
    soundfile.write(str(path), (np.clip(audio, -1, 1) * 32767).astype(np.int16), 48000, subtype="PCM_16")
    return path


def process_on(station_id: str, tmp_path, recording_path, **settings_values):
    import shutil

    from birdflow.core.recordings import describe_audio_file
    from birdflow.flows.process_recording import process_recording
    from birdflow.flows.run_resources import use_run_resources
    from birdflow.settings import Settings

    settings = Settings(station_id=station_id, data_dir=tmp_path / station_id, **settings_values)
    station = use_run_resources(settings)
    settings.recordings_dir.mkdir(parents=True, exist_ok=True)
    info = describe_audio_file(recording_path, station_id, "upload")
    shutil.copy(recording_path, settings.recordings_dir / info.file_name)
    state = cast(State, process_recording(info, return_state=True))
    assert state.is_completed(), state.message
    return settings, station, info, state


def test_silence_keeps_birds_and_clips_but_zeroes_the_human_voice(
    prefect_server, tmp_path, birds_then_speech, monkeypatch
):
    import soundfile

    from birdflow.core.sinks import read_detections
    from birdflow.flows import run_resources

    monkeypatch.setattr(run_resources, "_current", None)
    silenced_before = (
        REGISTRY.get_sample_value(
            "birdflow_privacy_filtered_recordings_total", {"station": "quiet", "action": "silenced"}
        )
        or 0
    )
    settings, station, info, state = process_on(
        "quiet",
        tmp_path,
        birds_then_speech,
        privacy_filter="silence",
        privacy_threshold=0.3,
        clip_min_confidence=0.3,
    )
    rows = read_detections(settings.detections_dir).to_pylist()
    assert rows and not [row for row in rows if row["scientific_name"].startswith("Human")]
    [goldfinch] = [row for row in rows if row["common_name"] == "American Goldfinch"]
    assert goldfinch["clip_key"].startswith("clips/quiet/Spinus_tristis/2025/06/01/")
    archive = settings.local_archive_dir
    clip, picture = archive / (goldfinch["clip_key"] + ".flac"), archive / (goldfinch["clip_key"] + ".png")
    assert soundfile.info(str(clip)).duration == pytest.approx(5.0, abs=0.01)  # 3 s window + 1 s padding each side
    assert picture.read_bytes().startswith(b"\x89PNG")
    [archived] = list(archive.rglob(f"{info.recording_id}.flac"))
    kept, _ = soundfile.read(str(archived), dtype="int16")
    original, _ = soundfile.read(str(birds_then_speech), dtype="int16")
    assert len(kept) == len(original)
    assert (kept[:480000] == original[:480000]).all()  # the birds, untouched
    assert not kept[12 * 48000 :].any()  # the windows where BirdNET hears the voice (12-15 s, 15 s-end), gone
    assert (
        REGISTRY.get_sample_value(
            "birdflow_privacy_filtered_recordings_total", {"station": "quiet", "action": "silenced"}
        )
        == silenced_before + 1
    )
    _, [artifact] = run_logs_and_artifacts(state.state_details.flow_run_id)
    import json

    table = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    assert [row["clip"] for row in table] == [clip.as_uri()] and table[0]["spectrogram"] == picture.as_uri()


def test_drop_keeps_the_detections_and_no_audio(prefect_server, tmp_path, birds_then_speech, monkeypatch):
    from birdflow.core.sinks import read_detections
    from birdflow.flows import run_resources

    monkeypatch.setattr(run_resources, "_current", None)
    settings, _, info, state = process_on(
        "private",
        tmp_path,
        birds_then_speech,
        privacy_filter="drop",
        privacy_threshold=0.3,
        clip_min_confidence=0.3,
    )
    assert state.result()["archive"] == {"privacy_dropped": True}
    rows = read_detections(settings.detections_dir).to_pylist()
    assert [row["common_name"] for row in rows] == ["American Goldfinch"] and rows[0]["clip_key"] is None
    assert not settings.local_archive_dir.exists() or not any(settings.local_archive_dir.rglob("*.*"))
    assert not list(settings.recordings_dir.iterdir())  # and the recording itself is gone from the station


def test_an_hour_a_sink_refuses_stays_due_and_maintenance_goes_on(prefect_server, tmp_path, influx_server, monkeypatch):
    from prefect import flow

    from birdflow.blocks import register_blocks
    from birdflow.core.birdnet import Detection
    from birdflow.core.detections import detections_table
    from birdflow.flows import run_resources
    from birdflow.flows.maintenance import write_hourly_counts
    from birdflow.flows.run_resources import use_run_resources
    from birdflow.settings import Settings

    @flow
    def hourly(settings):
        return write_hourly_counts(settings)

    monkeypatch.setattr(run_resources, "_current", None)
    info = recording_info(start_time=datetime(2025, 6, 1, 5, 30, tzinfo=timezone.utc))
    table = detections_table(info, [Detection(0.0, 3.0, "Junco hyemalis", "Dark-eyed Junco", 0.8)], "m", "a1")
    values = dict(station_id="hourly", data_dir=tmp_path / "data", influx_enabled=True, influx_host=influx_server.url)
    register_blocks(Settings(**values, influx_token="wrong-token"))  # the sinks load the saved block
    refused = use_run_resources(Settings(**values, influx_token="wrong-token"))
    refused.species.tally(table)
    outcome = hourly(refused.settings)
    assert (outcome["hours_written"], outcome["hours_failed"]) == (0, 1)
    assert not [line for line in influx_server.lines if line.startswith("species_hourly")]
    register_blocks(Settings(**values, influx_token="test-token"))  # the token fixed: the hour goes out
    accepted = use_run_resources(Settings(**values, influx_token="test-token"))
    outcome = hourly(accepted.settings)
    assert (outcome["hours_written"], outcome["hours_failed"]) == (1, 0)
    [line] = [line for line in influx_server.lines if line.startswith("species_hourly")]
    assert "Dark-eyed\\ Junco" in line and "detections=1i" in line


def test_clips_in_s3_keep_only_the_best_of_a_species_day(prefect_server, seaweed, tmp_path, sample_48k, monkeypatch):
    """Two recordings of the same goldfinch on the same day, one clip allowed: the better one stays in S3, the other
    is pushed out (deleted) or never cut, whichever came first."""
    import numpy as np
    import soundfile

    from birdflow.blocks import register_blocks
    from birdflow.core.sinks import read_detections
    from birdflow.flows import run_resources

    monkeypatch.setattr(run_resources, "_current", None)
    seaweed.create_bucket("clips-test")
    samples, rate = soundfile.read(str(sample_48k), dtype="int16")
    recordings = []
    for number, scale in enumerate((1.0, 0.4)):  # the same call, louder and quieter: two confidences
        path = tmp_path / f"mic{number + 1}_20250601T05{30 + number}00Z.wav"
        soundfile.write(str(path), (samples * scale).astype(np.int16), rate, subtype="PCM_16")
        recordings.append(path)
    values = dict(
        archive_backend="s3",
        s3_bucket="clips-test",
        s3_prefix="archive",
        s3_endpoint_url=seaweed.endpoint_url,
        aws_access_key_id=seaweed.access_key,
        aws_secret_access_key=seaweed.secret_key,
        s3_block_name="clips-test-archive",
        clip_min_confidence=0.1,
        clips_per_species_per_day=1,
        review_rare=False,  # a clip under review stays whatever the budget (tests/app/test_review_ui.py)
    )
    from birdflow.settings import Settings

    register_blocks(Settings(station_id="s3clips", data_dir=tmp_path / "s3clips", **values))
    for path in recordings:
        settings, _, _, _ = process_on("s3clips", tmp_path, path, **values)
    rows = [
        row
        for row in read_detections(settings.detections_dir).to_pylist()
        if row["common_name"] == "American Goldfinch"
    ]
    assert len(rows) == 2 and len({row["confidence"] for row in rows}) == 2
    best = max(rows, key=lambda row: row["confidence"])
    listed = seaweed.client().list_objects_v2(Bucket="clips-test", Prefix="archive/clips/s3clips/Spinus_tristis/")
    keys = sorted(item["Key"] for item in listed.get("Contents", []))
    assert keys == [f"archive/{best['clip_key']}.flac", f"archive/{best['clip_key']}.png"]


def test_a_run_queues_its_detections_for_mqtt_once_however_often_it_runs(
    prefect_server, tmp_path, sample_48k, monkeypatch
):
    import json

    from birdflow.flows import run_resources
    from birdflow.flows.process_recording import process_recording

    monkeypatch.setattr(run_resources, "_current", None)
    settings, station, info, _ = process_on("mqtt02", tmp_path, sample_48k, mqtt_host="127.0.0.1")
    queued = [item.message for item in station.outbox.head(100)]
    detections = [json.loads(message.payload) for message in queued if message.topic == "birdflow/mqtt02/detection"]
    assert [d["common_name"] for d in detections] == ["American Goldfinch"]
    assert {message.topic for message in queued if message.retain} >= {
        "birdflow/mqtt02/species/spinus_tristis",
        "homeassistant/sensor/birdflow_mqtt02_spinus_tristis/config",
    }
    rerun = cast(State, process_recording(info, return_state=True))  # as the UI's rerun, from the archive
    assert rerun.is_completed() and len(station.outbox) == len(queued)
