"""The daily export flow: a day's detections in every format, stored in the station's archive and linked from
the run's page; a format the station cannot make is skipped, the others still stored."""

from __future__ import annotations

import csv
from datetime import date, datetime, timedelta, timezone

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from birdflow.core.sinks import ParquetSink
from birdflow.settings import Settings
from tests.builders import JUNE_MORNING, recording_info, two_listeners_detections


def station_with_detections(tmp_path, **values) -> Settings:
    """Detections of June 1st (two listeners, three recordings) and one of June 2nd, in the station's tables."""
    import pyarrow as pa

    from birdflow.core.birdnet import Detection
    from birdflow.core.detections import detections_table

    settings = Settings(station_id="exporter", data_dir=tmp_path / "data", **values)
    next_day = detections_table(
        recording_info("mic1", start_time=JUNE_MORNING + timedelta(days=1), content_hash="ef" * 32),
        [Detection(0.0, 3.0, "Spinus tristis", "American Goldfinch", 0.7)],
        "BirdNET_GLOBAL_6K_V2.4",
        "a1",
    )
    sink = ParquetSink.in_folders(settings.table_folders)
    sink.write(pa.concat_tables([two_listeners_detections(), next_day]))
    return settings


def test_a_days_export_is_archived_in_every_format_and_linked_from_its_run(prefect_server, tmp_path, monkeypatch):
    from birdflow.flows import run_resources
    from birdflow.flows.export import DAILY_FORMATS, export_day

    monkeypatch.setattr(run_resources, "_current", None)
    settings = station_with_detections(tmp_path, latitude=45.5231, longitude=-122.6765, country_code="US")
    run_resources.use_run_resources(settings)
    state = export_day(day=date(2025, 6, 1), return_state=True)
    assert state.is_completed(), state.message
    archived = state.result()
    assert set(archived) == set(DAILY_FORMATS)
    day = settings.local_archive_dir / "exports" / "exporter" / "2025" / "06" / "01"
    assert len(list((day / "raven").iterdir())) == 3  # the three recordings of June 1st, not June 2nd's
    assert (day / "csv" / "detections.csv").read_text().count("\n") == 1 + 5
    assert (day / "dwc" / "occurrences.zip").stat().st_size > 0
    # eBird in Portland's local time (found from the coordinates): 05:30Z is 22:30 the evening before
    ebird = list(csv.reader((day / "ebird" / "ebird.csv").read_text().splitlines()))
    assert {record[8] for record in ebird} == {"05/31/2025"}
    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    assert "5 detection(s)" in artifact.data and f"]({archived['csv'][0]})" in artifact.data


def test_without_coordinates_the_darwin_core_archive_is_skipped_and_the_rest_stored(
    prefect_server, tmp_path, monkeypatch
):
    from birdflow.flows import run_resources
    from birdflow.flows.export import export_day

    monkeypatch.setattr(run_resources, "_current", None)
    run_resources.use_run_resources(station_with_detections(tmp_path))
    state = export_day(day=date(2025, 6, 1), formats=["csv", "dwc"], return_state=True)
    assert state.is_completed() and set(state.result()) == {"csv"}
    # a scheduled run passes no day: it exports the day before, and its name says which
    yesterday = export_day(formats=["csv"], return_state=True)
    with get_client(sync_client=True) as client:
        name = client.read_flow_run(yesterday.state_details.flow_run_id).name
    assert name == f"export-{(datetime.now(timezone.utc) - timedelta(days=1)).date()}", name
