"""How a module that borrows a library's internals says so: each name with its reason, and the tested range.

One such module per library (prefect_internals, uvicorn_internals); tests/runtime/test_internals.py resolves every
name they list and checks what birdflow relies on of it."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Borrowed:
    """One internal name, `module:attribute.path` (or a module); what birdflow relies on of it; why it is used.

    `calls`: the parameters birdflow calls or overrides it with (a callable); `sets`: attributes its `__init__`
    sets that birdflow reads; `says`: text of the library's own that birdflow matches (in its log lines)."""

    name: str
    why: str
    calls: tuple[str, ...] = ()
    sets: tuple[str, ...] = ()
    says: tuple[str, ...] = ()


def version_tuple(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as 3.9.1 or 3.10.0rc1."""
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None:
        raise ImportError(f"cannot read the version {version!r}")
    return int(found[1]), int(found[2])


def check_tested(module: str, library: str, version: str, tested: tuple[tuple[int, int], tuple[int, int]]) -> None:
    """Refuses a `library` outside the range `module` was tested with, naming the module (its names may have
    moved) and the test that lists them."""
    low, high = tested
    if not low <= version_tuple(version) < high:
        raise ImportError(
            f"{module} is tested with {library} >={low[0]}.{low[1]},<{high[0]}.{high[1]}, and this is {library}"
            f" {version}: tests/runtime/test_internals.py lists the internal names that moved"
        )
