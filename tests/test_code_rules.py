"""The rules a machine checks, so that style and layering are never a review topic: the layers of
ARCHITECTURE (import-linter, contracts in pyproject.toml), lint and format (ruff), types (mypy)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT

BIN = Path(sys.executable).parent

RULES = {
    "layers": [str(BIN / "lint-imports"), "--no-cache"],
    "lint": [str(BIN / "ruff"), "check", "--no-cache", "."],
    "format": [str(BIN / "ruff"), "format", "--check", "--no-cache", "."],
    "types": [str(BIN / "mypy"), "--no-incremental"],
}


@pytest.mark.parametrize("rule", RULES)
def test_the_code_keeps_the_rule(rule):
    result = subprocess.run(RULES[rule], cwd=PROJECT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(RULES[rule])}:\n{result.stdout}\n{result.stderr}"


def test_an_import_against_the_layers_is_refused(tmp_path):
    """The contracts catch what they are for: the core importing the settings, one layer up."""
    for name in ("birdflow", "flows", "ingest_api", "blocks", "deployments"):
        shutil.copytree(PROJECT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT / "pyproject.toml", tmp_path)
    core = tmp_path / "birdflow" / "core" / "disk.py"
    core.write_text(core.read_text() + "\nfrom birdflow.settings import Settings  # noqa\n")
    result = subprocess.run(
        [str(BIN / "lint-imports"), "--no-cache"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode == 1, result.stdout
    assert "birdflow.core.disk -> birdflow.settings" in result.stdout, result.stdout


def test_the_core_is_given_plain_values():
    """The layers forbid the core to import the settings or Prefect; this catches it being handed them by shape:
    a parameter taking the settings object, or a prefect-aws block read by its attributes."""
    block_attributes = {"credentials", "bucket_folder", "get_s3_client", "upload_from_path"}
    handed = []
    for module in sorted((PROJECT / "birdflow" / "core").glob("*.py")):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.arguments):
                names = [arg.arg for arg in node.posonlyargs + node.args + node.kwonlyargs]
                handed += [f"{module.name}: parameter {name}" for name in names if name == "settings"]
            elif isinstance(node, ast.Attribute) and node.attr in block_attributes:
                handed += [f"{module.name}:{node.lineno} .{node.attr}"]
    assert handed == []
