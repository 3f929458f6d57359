"""Every Prefect and uvicorn internal name birdflow uses is where birdflow expects it, as it expects it: an upgrade
that moves one fails here, with the list of what moved."""

from __future__ import annotations

import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from birdflow.runtime import prefect_internals, uvicorn_internals
from birdflow.runtime.borrowed import Borrowed, check_tested

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_FOLDERS = ("birdflow", "flows", "ingest_api", "blocks", "deployments")


def resolve(name: str) -> Any:
    module_name, _, path = name.partition(":")
    found: Any = importlib.import_module(module_name)
    for part in filter(None, path.split(".")):
        found = getattr(found, part)
    return found


def what_moved(borrowed: Borrowed) -> list[str]:
    """What of `borrowed` is not as birdflow relies on it; empty when all is."""
    try:
        found = resolve(borrowed.name)
    except (ImportError, AttributeError) as exc:
        return [f"{borrowed.name}: gone ({exc})"]
    moved = []
    if borrowed.calls:
        target = found.__init__ if inspect.isclass(found) else found
        parameters = inspect.signature(target).parameters
        moved += [f"{borrowed.name}: no parameter {name!r}" for name in borrowed.calls if name not in parameters]
    if borrowed.sets:
        source = inspect.getsource(found)
        moved += [
            f"{borrowed.name}: sets no {attr!r}"
            for attr in borrowed.sets
            if not re.search(rf"self\.{attr}\s*(:[^=]*)?=", source)
        ]
    if borrowed.says:
        source = inspect.getsource(found)
        moved += [f"{borrowed.name}: no longer says {text!r}" for text in borrowed.says if text not in source]
    return moved


@pytest.mark.parametrize("module", [prefect_internals, uvicorn_internals], ids=lambda module: module.__name__)
def test_every_borrowed_name_is_where_birdflow_expects_it(module):
    moved = [problem for borrowed in module.BORROWED for problem in what_moved(borrowed)]
    assert not moved, "\n".join(moved)


def test_a_moved_name_is_reported_with_what_moved():
    assert what_moved(Borrowed("prefect.flow_engine:FlowRunEngine.no_such_method", "")) == [
        "prefect.flow_engine:FlowRunEngine.no_such_method: gone"
        " (type object 'FlowRunEngine' has no attribute 'no_such_method')"
    ]
    [changed] = what_moved(Borrowed("prefect.flow_engine:FlowRunEngine.set_state", "", calls=("state", "forced")))
    assert changed == "prefect.flow_engine:FlowRunEngine.set_state: no parameter 'forced'"
    [unsaid] = what_moved(Borrowed("prefect.flow_engine", "", says=("Starting flow run",)))
    assert "no longer says 'Starting flow run'" in unsaid


def test_a_version_outside_the_tested_range_is_refused_naming_the_module():
    check_tested("birdflow.runtime.prefect_internals", "Prefect", "3.9.7", ((3, 9), (3, 10)))
    with pytest.raises(
        ImportError,
        match=r"birdflow.runtime.prefect_internals is tested with Prefect >=3.9,<3.10,"
        r" and this is Prefect 3.10.0rc1",
    ):
        check_tested("birdflow.runtime.prefect_internals", "Prefect", "3.10.0rc1", ((3, 9), (3, 10)))


def test_no_module_but_the_fences_imports_prefect_internals_or_uvicorn_protocols():
    """`prefect._x`, Prefect's server package, or uvicorn's protocols, imported anywhere else in what a station
    runs, is an internal name no test watches."""
    fences = {Path("birdflow/runtime/prefect_internals.py"), Path("birdflow/runtime/uvicorn_internals.py")}
    internal = re.compile(
        r"^\s*(from|import)\s+(prefect\._|prefect\.[\w.]*\._|(prefect\.(server|cli|flow_engine|task_engine|utilities)"
        r"|docket|uvicorn\.protocols)\b)",
        re.MULTILINE,
    )
    found = [
        f"{path.relative_to(ROOT)}: {match.group(0).strip()}"
        for folder in RUNTIME_FOLDERS
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path.relative_to(ROOT) not in fences
        for match in internal.finditer(path.read_text())
    ]
    assert not found, "\n".join(found)


def test_a_client_process_does_not_load_prefects_server():
    """The fence imports the server's names on first use: the executor and the CLI do not pay for them."""
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, birdflow.runtime.prefect_internals as m; m.FlowRunEngine;"
            " print(sorted(n for n in sys.modules if n.startswith('prefect.server.services')))",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert loaded.stdout.strip() == "[]"
