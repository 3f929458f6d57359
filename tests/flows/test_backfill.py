"""`birdflow backfill` from an S3 prefix (SeaweedFS): dry run, a real run, then everything skipped;
and the pure selection of candidates by time, listener and station."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timezone

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

from birdflow.core.backfill_plan import (
    ALREADY_PROCESSED,
    UNKNOWN_LISTENER,
    UNREADABLE,
    candidate,
    parse_s3_source,
    plan,
    select,
)
from birdflow_tools.testbed import free_port

UTC = timezone.utc


def test_select_by_time_listener_and_station():
    modified = datetime(2025, 7, 1, tzinfo=UTC)
    found = [
        candidate("north/mic1/2025/06/01/mic1_20250601T053000Z_aaaa.wav", modified, 10),
        candidate("north/mic2/2025/06/02/mic2_20250602T053000Z_bbbb.wav", modified, 10),
        candidate("south/mic1/2025/06/01/mic1_20250601T060000Z_cccc.wav", modified, 10),
        candidate("dump/noname.wav", modified, 10),  # no time in the name: the file time counts
    ]
    june_first = dict(since=datetime(2025, 6, 1, tzinfo=UTC), until=datetime(2025, 6, 2, tzinfo=UTC))
    assert [c.name for c in select(found, **june_first)] == [found[0].name, found[2].name]
    assert [c.name for c in select(found, listener="mic1", station="north")] == [found[0].name]
    assert [c.name for c in select(found, since=datetime(2025, 6, 30, tzinfo=UTC))] == ["noname.wav"]
    # a date typed into the Prefect UI's form has no zone: UTC
    assert select(found, since=datetime(2025, 6, 1), until=datetime(2025, 6, 2)) == select(found, **june_first)
    assert parse_s3_source("s3://bucket/a/b") == ("bucket", "a/b") and parse_s3_source("/mnt/sd") is None
    with pytest.raises(ValueError):
        parse_s3_source("s3:///nobucket")


@pytest.mark.e2e
def test_a_folder_source_that_is_missing_or_not_allowed_says_why(tmp_path):
    from birdflow.flows.backfill import Source
    from birdflow.settings import Settings

    settings = Settings(data_dir=tmp_path / "data")
    with pytest.raises(ValueError, match="nothing has failed on this station"):
        Source(str(settings.failed_dir), settings)
    with pytest.raises(ValueError, match="is not a folder"):
        Source(str(tmp_path / "nowhere"), settings)
    (tmp_path / "card").mkdir()
    with pytest.raises(ValueError, match="add it to the setting 'backfill_roots'"):
        Source(str(tmp_path / "card"), settings)
    assert Source(
        str(tmp_path / "card"), Settings(data_dir=tmp_path / "data", backfill_roots=[tmp_path / "card"])
    ).folder.is_dir()


def test_backfill_from_s3_dry_run_then_process_then_skip(prefect_server, seaweed, tmp_path, sample_48k):
    bucket = "birdflow-backfill"
    seaweed.create_bucket(bucket)
    seaweed.client().put_object(
        Bucket=bucket, Key="old-station/mic3_20250601T053000Z.wav", Body=sample_48k.read_bytes()
    )
    settings_file = tmp_path / "settings.yaml"
    settings_file.write_text(
        yaml.safe_dump(
            {
                "station_id": "bf",
                "data_dir": str(tmp_path / "data"),
                "prefect_api_url": prefect_server.api_url,
                "archive_backend": "s3",
                "s3_bucket": bucket,
                "s3_prefix": "archive",
                "s3_endpoint_url": seaweed.endpoint_url,
                "aws_access_key_id": seaweed.access_key,
                "s3_block_name": "backfill-test-archive",
            }
        )
    )
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": seaweed.secret_key}
    cli = [sys.executable, "-m", "birdflow.app.cli", "--settings", str(settings_file)]
    subprocess.run(cli + ["blocks", "register"], env=env, check=True, capture_output=True, timeout=120)

    def backfill(*extra) -> str:
        result = subprocess.run(
            cli + ["backfill", f"s3://{bucket}/old-station", *extra],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        return result.stdout

    assert "found 1, skipped 0 (already processed), refused 0 (unknown listener), processed 0" in backfill("--dry-run")
    assert "would process 1:\n  old-station/mic3_20250601T053000Z.wav" in backfill("--dry-run")
    assert "found 1, skipped 0 (already processed), refused 0 (unknown listener), processed 1, failed 0" in backfill()
    assert list((tmp_path / "data" / "detections").rglob("*.parquet"))
    archived = seaweed.client().list_objects_v2(Bucket=bucket, Prefix="archive/bf/mic3/2025/06/01/")
    keys = [item["Key"] for item in seaweed.client().list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert archived["KeyCount"] == 1, keys  # the audio is archived under the station's layout
    assert "found 1, skipped 1 (already processed), refused 0 (unknown listener), processed 0" in backfill()
    assert not list((tmp_path / "data" / "backfill").iterdir())  # scratch downloads are removed
    other = backfill("--min-confidence", "0.3")  # other thresholds: analyzed again, rows side by side
    assert "processed 1" in other
    assert len(list((tmp_path / "data" / "detections").rglob("*.parquet"))) == 2


def test_plan_skips_files_seen_before_without_reading_them_and_refuses_unknown_listeners():
    modified = datetime(2025, 7, 1, tzinfo=UTC)
    seen = candidate("dump/mic1_20250601T053000Z.wav", modified, 10)
    fresh = candidate("dump/mic1_20250601T054000Z.wav", modified, 10)
    stranger = candidate("dump/mic9_20250601T053000Z.wav", modified, 10)
    broken = candidate("dump/mic1_20250601T055000Z.wav", modified, 10)
    read = []

    def describe(item):
        read.append(item.name)
        if item is broken:
            raise ValueError("cannot decode audio: not a WAV")
        return type("Info", (), {"recording_id": "id-" + item.name})()

    decisions = list(
        plan(
            [seen, fresh, stranger, broken],
            describe,
            processed=lambda recording_id: recording_id == "id-seen",
            known_recording=lambda item: "id-seen" if item is seen else None,
            listener_known=lambda listener: listener == "mic1",
        )
    )
    assert [(d.process, d.reason, d.detail) for d in decisions] == [
        (False, ALREADY_PROCESSED, ""),
        (True, "", ""),
        (False, UNKNOWN_LISTENER, "mic9"),
        (False, UNREADABLE, "cannot decode audio: not a WAV"),
    ]
    assert read == [fresh.name, broken.name]  # neither the file seen before nor the stranger's was read


@pytest.mark.e2e
def test_a_card_dump_dry_run_without_a_server_then_unknown_listeners_refused_and_an_interrupted_backfill_resumed(
    prefect_server, tmp_path, sample_48k
):
    dump = tmp_path / "sd-card"
    dump.mkdir()
    import soundfile

    (dump / "mic1_20250601T053000Z.wav").write_bytes(sample_48k.read_bytes())
    (dump / "mic9_20250601T053000Z.wav").write_bytes(sample_48k.read_bytes())
    (tmp_path / "elsewhere.wav").write_bytes(sample_48k.read_bytes())
    (dump / "mic1_20250601T070000Z.wav").symlink_to(tmp_path / "elsewhere.wav")  # not the card's: never listed
    samples, rate = soundfile.read(str(sample_48k), dtype="int16")
    soundfile.write(str(dump / "mic1_20250601T060000Z.wav"), samples // 2, rate)  # other audio of the same listener
    settings = {"station_id": "card", "data_dir": str(tmp_path / "data"), "backfill_roots": [str(dump)]}
    settings_file = tmp_path / "settings.yaml"
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}

    def birdflow(*args, api_url: str = prefect_server.api_url) -> subprocess.CompletedProcess:
        settings_file.write_text(yaml.safe_dump({**settings, "prefect_api_url": api_url}))
        return subprocess.run(
            [sys.executable, "-m", "birdflow.app.cli", "--settings", str(settings_file), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    assert birdflow("listeners", "add", "mic1").returncode == 0  # the station knows mic1, not mic9
    nobody = f"http://127.0.0.1:{free_port()}/api"  # no server there
    dry = birdflow("backfill", str(dump), "--dry-run", api_url=nobody)
    assert dry.returncode == 1, dry.stderr[-2000:]  # files were refused
    assert "found 3, skipped 0 (already processed), refused 1 (unknown listener), processed 0, failed 0" in dry.stdout
    assert "listener(s) mic9, which this station does not know" in dry.stdout
    assert dry.stdout.count(f"  {dump}/mic1_") == 2 and "Traceback" not in dry.stderr
    down = birdflow("backfill", str(dump), api_url=nobody)
    assert (
        down.returncode != 0
        and down.stderr.strip()
        == f"birdflow: the Prefect API at {nobody} does not answer: check setting 'prefect_api_url'"
    )
    # interrupted after the first recording (what --until reproduces), then run again: nothing done twice
    first = birdflow("backfill", str(dump), "--until", "2025-06-01T05:45")
    assert (
        "found 2, skipped 0 (already processed), refused 1 (unknown listener), processed 1, failed 0" in first.stdout
    ), first.stderr[-3000:]
    assert first.returncode == 1 and "Traceback" not in first.stderr  # the refusal: and its run ended Failed
    with get_client(sync_client=True) as client:
        [refusing] = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[f"backfill-{dump}"]))
        )
    assert (
        refusing.state.type.value == "FAILED"
        and "1 refused (unknown listener: allow_unknown)" in refusing.state.message
    )
    resumed = birdflow("backfill", str(dump), "--allow-unknown")
    assert (
        "found 3, skipped 1 (already processed), refused 0 (unknown listener), processed 2, failed 0" in resumed.stdout
    ), resumed.stderr[-3000:]
    again = birdflow("backfill", str(dump), "--dry-run", "--allow-unknown", api_url=nobody)
    assert "found 3, skipped 3 (already processed)" in again.stdout and "would process 0:" in again.stdout


def test_a_backfill_on_the_central_server_of_a_station_with_its_own_history_hands_it_the_recordings(
    prefect_server, tmp_path, sample_48k
):
    """The run is on the fleet's central server (this test's); the recordings go to the station's recordings
    folder, where its executor runs them on its own server: no recording's run on the central one."""
    from birdflow.core.recordings import load_info
    from birdflow.flows.backfill import backfill
    from birdflow.flows.run_resources import use_run_resources
    from birdflow.settings import Settings

    dump = tmp_path / "card"
    dump.mkdir()
    (dump / "hand1_20250601T053000Z.wav").write_bytes(sample_48k.read_bytes())
    (dump / "hand1_20250601T060000Z.wav").write_bytes(sample_48k.read_bytes()[:-4800])
    settings = Settings.model_validate(
        {
            "station_id": "own",
            "data_dir": tmp_path / "data",
            "backfill_roots": [str(dump)],
            "central_api_url": prefect_server.api_url,
        }
    )
    use_run_resources(settings)
    summary = backfill(source=str(dump), allow_unknown=True)
    assert (summary["handed"], summary["processed"], summary["failed"]) == (2, 0, 0)
    queued = sorted(settings.recordings_dir.glob("*.wav"))
    infos = [load_info(path) for path in queued]
    assert [(info.listener_id, info.source, info.source_path) for info in infos] == [("hand1", "backfill", None)] * 2
    assert sorted(path.stat().st_size for path in queued) == sorted(path.stat().st_size for path in dump.iterdir())
    assert list(dump.iterdir()) and not list(settings.partial_dir.iterdir())  # the card keeps its files
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_="hand1-20250601T")))
        backfills = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[f"backfill-{dump}"]))
        )
    assert not runs  # no recording's run on the central server (a recording's run is named listener-start)
    assert [run.state.type.value for run in backfills] == ["COMPLETED"]
