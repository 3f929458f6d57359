"""`birdflow model convert`: the converted model written where asked, checked against the TFLite model."""

from __future__ import annotations

import re

from birdflow.app.cli import main
from birdflow.core.birdnet import model_files
from birdflow.core.birdnet_runtimes import OnnxSession, file_digest


def test_convert_writes_a_checked_model_that_names_its_source(tmp_path, capsys):
    target = tmp_path / "models" / "birdnet.onnx"
    assert main(["model", "convert", "--output", str(target)]) == 0
    said = capsys.readouterr().out
    agreement = re.search(r"confidences within ([0-9.e-]+) of the TFLite model", said)
    assert agreement and float(agreement.group(1)) < 1e-4, said
    assert re.search(r"onnxruntime [0-9.]+ windows/s on one core, ai-edge-litert [0-9.]+ windows/s", said), said
    assert OnnxSession(target, 1).source_digest == file_digest(model_files()[0])
    assert [path.name for path in target.parent.iterdir()] == ["birdnet.onnx"]  # no partial file left
