"""Settings validation, and the detection sinks against real servers (Parquet on disk, InfluxDB line protocol)."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import pytest

from birdflow.core.birdnet import Detection
from birdflow.core.detections import detections_table
from birdflow.core.sinks import InfluxSink, ParquetSink, read_detections
from birdflow.settings import Settings, SettingsError, load_settings
from birdflow_tools.testbed import parse_line
from tests.builders import recording_info

RECORDING = recording_info(listener_id="mic-1", recording_id="mic-1_20250601T053000Z_abcdef12")
FOUND = [
    Detection(3.0, 6.0, "Spinus tristis", "American Goldfinch", 0.365),
    Detection(6.0, 9.0, "Turdus migratorius", "American Robin", 0.5),
]


def test_yaml_with_env_overrides(tmp_path):
    file = tmp_path / "settings.yaml"
    file.write_text("station_id: ridge\nmax_duration_s: 30\nkeep_local_recordings: true\n")
    settings = load_settings(file, {"MAX_DURATION_S": "15", "KEEP_LOCAL_RECORDINGS": "0", "EXCLUDE_SPECIES": "a, b"})
    assert (settings.station_id, settings.ingest.max_duration_s, settings.archive.keep_local_recordings) == (
        "ridge",
        15.0,
        False,
    )
    assert settings.analysis.exclude_species == ("a", "b")


def test_the_settings_file_in_use_is_the_one_given_then_the_environments_then_the_folders(tmp_path, monkeypatch):
    from birdflow.settings import settings_file_in_use

    monkeypatch.chdir(tmp_path)
    assert settings_file_in_use(None, {}) is None
    (tmp_path / "settings.yaml").write_text("station_id: here\n")
    assert settings_file_in_use(None, {}) == Path("settings.yaml")
    assert settings_file_in_use(None, {"BIRDFLOW_SETTINGS": "/etc/b.yaml"}) == Path("/etc/b.yaml")
    assert settings_file_in_use("given.yaml", {"BIRDFLOW_SETTINGS": "/etc/b.yaml"}) == Path("given.yaml")
    assert load_settings(None, {}).station_id == "here"


def test_no_two_settings_share_a_flat_name_or_an_environment_name():
    from birdflow.settings.model import SECTIONS, Settings

    names = [name for name in Settings.model_fields if name not in SECTIONS]
    names += [name for model in SECTIONS.values() for name in model.model_fields]
    assert sorted(name for name in set(names) if names.count(name) > 1) == []
    upper = [name.upper() for name in names]
    assert sorted(name for name in set(upper) if upper.count(name) > 1) == []
    assert len(Settings.flat_fields()) == len(names)


def test_a_setting_written_twice_in_the_file_stops_with_both_line_numbers(tmp_path):
    file = tmp_path / "settings.yaml"
    file.write_text("station_id: ridge\nconfirm_count: 2\nlatitude: 42.4\nconfirm_count: 3\n")
    with pytest.raises(SettingsError, match="setting 'confirm_count' is written twice, on lines 2 and 4"):
        load_settings(file, {})


def test_the_two_confirmation_windows_have_names_of_their_own_and_the_old_name_is_read_once(tmp_path, caplog):
    file = tmp_path / "settings.yaml"
    file.write_text("confirm_count: 3\nconfirm_count_window_s: 1\nrare_confirm_window_s: 600\n")
    settings = load_settings(file, {})
    assert (settings.analysis.confirm_count, settings.analysis.confirm_count_window_s) == (3, 1.0)
    assert settings.detections.rare_confirm_window_s == 600.0
    # the old name set the cross-station window only: it still does, with a line that says what it became
    file.write_text("confirm_window_s: 1800\n")
    with caplog.at_level("WARNING", logger="birdflow.settings"):
        settings = load_settings(file, {})
    assert settings.detections.rare_confirm_window_s == 1800.0 and settings.analysis.confirm_count_window_s == 15.0
    assert "setting 'confirm_window_s' (in " in caplog.text and "is read as 'rare_confirm_window_s'" in caplog.text
    with pytest.raises(SettingsError, match="are one setting: keep 'rare_confirm_window_s'"):
        load_settings(file, {"RARE_CONFIRM_WINDOW_S": "60"})
    # an old settings.yaml of `birdflow init` wrote it twice: stopped, with the two lines and what they became
    file.write_text("confirm_window_s: 15\nconfirm_window_s: 3600\n")
    with pytest.raises(SettingsError, match="lines 1 and 2: keep one .*'confirm_count_window_s'"):
        load_settings(file, {})


def test_the_addresses_people_open_are_web_addresses():
    settings = load_settings(None, {"PUBLIC_URL": "https://pi.example.org:8000/", "INGEST_PORT": "8100"})
    assert settings.station_url == "https://pi.example.org:8000"
    assert load_settings(None, {"INGEST_PORT": "8100"}).station_url == "http://127.0.0.1:8100"  # this machine's own
    with pytest.raises(SettingsError, match=r"setting 'public_url' \(env PUBLIC_URL\): .*http\(s\)://host"):
        load_settings(None, {"PUBLIC_URL": "pi.example.org:8000"})
    with pytest.raises(SettingsError, match="setting 'public_ui_url'"):
        load_settings(None, {"PUBLIC_UI_URL": "https://prefect.example.org/?x=1"})


def test_renaming_the_window_of_confirm_count_keeps_every_analysis_id():
    from birdflow.core.analysis import AnalysisParams

    # the ids the parameters had under the old name: cached results, the processed record and detection ids hold
    assert AnalysisParams().analysis_id == "2ee054c0e742"
    assert AnalysisParams(confirm_count=3, confirm_count_window_s=1).analysis_id == "7e0bd11412f1"


def test_switches_written_bare_in_yaml_are_the_words_written(tmp_path):
    file = tmp_path / "settings.yaml"
    file.write_text("ingest_auth: on\nprivacy_filter: off\n")  # YAML 1.1 reads both as booleans
    settings = load_settings(file, {})
    assert (settings.ingest.ingest_auth, settings.detections.privacy_filter) == ("on", "off")
    file.write_text("privacy_filter: on\n")  # not one of its words: still refused, by name
    with pytest.raises(SettingsError, match="setting 'privacy_filter'"):
        load_settings(file, {})


def test_a_dot_env_file_counts_as_environment_that_the_real_one_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(
        "# secrets\nexport STATION_ID='from-dotenv'\nINFLUX_TOKEN=pa$word\nKEEP_LOCAL_RECORDINGS=yes\nLATITUDE=\n"
    )
    monkeypatch.delenv("STATION_ID", raising=False)
    settings = load_settings()
    assert settings.station_id == "from-dotenv" and settings.sinks.influx_token.get_secret_value() == "pa$word"
    assert settings.archive.keep_local_recordings is True and settings.analysis.latitude is None
    monkeypatch.setenv("STATION_ID", "from-environment")
    assert load_settings().station_id == "from-environment"


@pytest.mark.parametrize(
    "yaml_text, env, message",
    [
        ("min_confidence: 2\n", {}, "setting 'min_confidence' (in "),
        ("", {"INGEST_PORT": "eighty"}, "setting 'ingest_port' (env INGEST_PORT)"),
        ("", {"KEEP_LOCAL_RECORDINGS": "maybe"}, "KEEP_LOCAL_RECORDINGS"),
        ("max_duration_s: 2\n", {}, "'max_duration_s' (2.0) must be greater than 'min_duration_s'"),
        ("archive_backend: s3\n", {}, "'s3_bucket' is required"),
        (
            "influx_enabled: true\ninflux_host: http://127.0.0.1:8181\n",
            {},
            "setting 'influx_token' (env INFLUX_TOKEN) is required",
        ),
        ("no_such_thing: 1\n", {}, "setting 'no_such_thing'"),
        ("station_id: ../x\n", {}, "setting 'station_id'"),
        ("- just\n- a list\n", {}, "must be a mapping"),
        ("mqtt_ca_file: /etc/broker-ca.crt\n", {}, "'mqtt_ca_file' is for TLS"),
        ("", {"MQTT_TOPIC_PREFIX": "birds/#"}, "setting 'mqtt_topic_prefix' (env MQTT_TOPIC_PREFIX)"),
    ],
)
def test_invalid_settings_name_the_setting(tmp_path, yaml_text, env, message):
    file = tmp_path / "settings.yaml"
    file.write_text(yaml_text)
    with pytest.raises(SettingsError) as error:
        load_settings(file, env)
    assert message in str(error.value)


def test_parquet_sink_is_idempotent_and_filterable(tmp_path):
    sink = ParquetSink(tmp_path, tmp_path / "hourly", tmp_path / "health", tmp_path / "reviews")
    table = detections_table(RECORDING, FOUND, "BirdNET_GLOBAL_6K_V2.4", "a1")
    assert sink.write(table) == 2
    assert sink.write(table) == 2  # a retry rewrites the same file
    assert read_detections(tmp_path).num_rows == 2
    robin = read_detections(tmp_path, species="american robin")
    assert robin.column("time").to_pylist() == [datetime(2025, 6, 1, 5, 30, 6, tzinfo=timezone.utc)]
    assert read_detections(tmp_path, listener="other").num_rows == 0
    assert read_detections(tmp_path, since=datetime(2025, 6, 1, 5, 30, 5, tzinfo=timezone.utc)).num_rows == 1
    sink.write(detections_table(RECORDING, FOUND[:1], "BirdNET_GLOBAL_6K_V2.5", "b2"))
    assert read_detections(tmp_path).num_rows == 3  # a new analysis is stored beside the old one


def test_influx_sink_writes_line_protocol_through_influxdb3_python(influx_server):
    sink = InfluxSink(influx_server.url, "birds", "detections", "test-token")
    assert sink.write(detections_table(RECORDING, FOUND, "BirdNET_GLOBAL_6K_V2.4", "a1")) == 2
    request = influx_server.requests[-1]
    database = request["query"].get("db") or request["query"].get("bucket")
    assert request["path"] in ("/api/v3/write_lp", "/api/v2/write") and database == ["birds"]
    parsed = sorted((parse_line(line) for line in influx_server.lines), key=lambda point: point[3])
    measurement, tags, fields, timestamp = parsed[0]
    assert measurement == "detections"
    assert tags["scientific_name"] == "Spinus tristis" and tags["common_name"] == "American Goldfinch"
    assert tags["listener_id"] == "mic-1" and tags["analysis_id"] == "a1"
    assert float(fields["confidence"]) == pytest.approx(0.365)
    assert timestamp == int(datetime(2025, 6, 1, 5, 30, 3, tzinfo=timezone.utc).timestamp() * 1e9)


def test_reviews_go_to_influx_as_a_point_per_detection_at_its_time(influx_server, tmp_path):
    from birdflow.core.reviews import ReviewStore, Verdict, id_of

    store = ReviewStore(tmp_path / "reviews.sqlite")
    row = detections_table(RECORDING, FOUND, "BirdNET_GLOBAL_6K_V2.4", "a1").to_pylist()[0]
    day = store.record(row, Verdict("relabelled", "ada", "ui", "Spinus pinus", "Pine Siskin"))
    sink = InfluxSink(influx_server.url, "birds", "detections", "test-token")
    assert sink.write_reviews(store.table(day)) == 1
    [(measurement, tags, fields, timestamp)] = [parse_line(line) for line in influx_server.lines]
    assert measurement == "reviews" and tags["detection_id"] == id_of(row) and tags["listener_id"] == "mic-1"
    assert fields["verdict"] == '"relabelled"' and fields["reviewed_common_name"] == '"Pine Siskin"'
    assert timestamp == int(row["time"].timestamp() * 1e9)  # a later verdict on it replaces this point


def test_influx_sink_reports_a_rejected_token(influx_server):
    sink = InfluxSink(influx_server.url, "birds", "detections", "wrong-token")
    with pytest.raises(Exception, match="401|nauthorized"):
        sink.write(detections_table(RECORDING, FOUND, "BirdNET_GLOBAL_6K_V2.4", "a1"))


@pytest.mark.skipif(
    not os.environ.get("INFLUX3_URL"),
    reason="set INFLUX3_URL (and INFLUX3_TOKEN, INFLUX3_DATABASE) to test a real InfluxDB 3",
)
def test_real_influxdb3_round_trip(tmp_path, monkeypatch, capsys):
    import json

    from influxdb_client_3 import InfluxDBClient3

    from birdflow.app.cli import main

    database = os.environ.get("INFLUX3_DATABASE", "birdflow_test")
    token = os.environ.get("INFLUX3_TOKEN", "")
    sink = InfluxSink(os.environ["INFLUX3_URL"], database, "detections_test", token)
    sink.write(detections_table(RECORDING, FOUND, "BirdNET_GLOBAL_6K_V2.4", "a1"))
    client = InfluxDBClient3(host=os.environ["INFLUX3_URL"], database=database, token=token or None)
    rows = client.query(
        "SELECT scientific_name FROM detections_test WHERE recording_id = 'mic-1_20250601T053000Z_abcdef12'"
    )
    assert sorted(rows.column("scientific_name").to_pylist()) == ["Spinus tristis", "Turdus migratorius"]
    # the same question through `birdflow sql --influx`
    monkeypatch.setenv("INFLUX_HOST", os.environ["INFLUX3_URL"])
    monkeypatch.setenv("INFLUX_DATABASE", database)
    monkeypatch.setenv("INFLUX_TOKEN", token)
    (tmp_path / "settings.yaml").write_text(f"data_dir: {tmp_path}\n")
    statement = (
        "SELECT scientific_name FROM detections_test WHERE recording_id = 'mic-1_20250601T053000Z_abcdef12' ORDER BY 1"
    )
    assert main(["--settings", str(tmp_path / "settings.yaml"), "sql", "--influx", "--format", "json", statement]) == 0
    assert [row["scientific_name"] for row in json.loads(capsys.readouterr().out)] == [
        "Spinus tristis",
        "Turdus migratorius",
    ]


def test_hourly_counts_go_to_their_own_influx_table(influx_server):
    import pyarrow as pa

    from birdflow.core.rarity import HOURLY_SCHEMA

    hour = datetime(2025, 6, 1, 5, tzinfo=timezone.utc)
    table = pa.table(
        {
            "time": [hour],
            "station_id": ["s1"],
            "listener_id": ["mic1"],
            "scientific_name": ["Junco hyemalis"],
            "common_name": ["Dark-eyed Junco"],
            "detections": [7],
            "best_confidence": [0.9],
        },
        schema=HOURLY_SCHEMA,
    )
    sink = InfluxSink(influx_server.url, "birds", "detections", "test-token", hourly_table="species_hourly")
    assert sink.write_hourly(table) == 1
    [line] = list(influx_server.lines)
    measurement, tags, fields, stamp = parse_line(line)
    assert (
        measurement == "species_hourly" and tags["listener_id"] == "mic1" and tags["common_name"] == "Dark-eyed Junco"
    )
    assert fields["detections"] in (7, "7i") and int(stamp) == int(hour.timestamp() * 1e9)


@pytest.mark.parametrize(
    "values, refused",
    [
        (
            {"central_api_url": "http://central:4200/api", "central_api_auth_string": "central:s3cret"},
            "central_api_url",
        ),
        ({"prefect_api_url": "http://10.0.0.2:4200/api", "prefect_api_auth_string": "admin:s3cret"}, "prefect_api_url"),
        ({"prefect_api_url": "http://[::ffff:10.0.0.2]:4200/api", "prefect_api_auth_string": "a:b"}, "prefect_api_url"),
        ({"central_api_url": "https://central.example.org/api", "central_api_auth_string": "central:s3cret"}, None),
        ({"central_api_url": "http://127.0.0.1:4200/api", "central_api_auth_string": "central:s3cret"}, None),
        (
            {
                "prefect_api_url": "http://prefect:4200/api",
                "prefect_api_auth_string": "a:b",
                "allow_plain_http_api": True,
            },
            None,
        ),
        ({"prefect_api_url": "http://prefect:4200/api"}, None),  # no password to lose
    ],
)
def test_a_prefect_password_is_refused_at_start_where_it_would_cross_the_network_in_clear(values, refused):
    if refused is None:
        Settings(**values)
        return
    with pytest.raises(ValueError, match=f"setting '{refused}' is .*https://.*allow_plain_http_api"):
        Settings(**values)
