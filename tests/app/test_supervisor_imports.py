"""The long-lived processes of `up` that need neither Prefect nor the model nor tables do not load them: each
of those libraries costs tens of MB in every such process, on a Pi that has 2-4 GB."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("pyarrow", "pandas", "prefect", "duckdb", "PIL", "ai_edge_litert", "tflite_runtime")


def test_the_supervisor_and_the_ingest_load_no_heavy_library():
    probe = (
        "import sys, birdflow.app.cli, birdflow.app.supervisor, birdflow.ingest_api.app; "
        f"print(','.join(name for name in {HEAVY!r} if name in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert loaded.stdout.strip() == ""
