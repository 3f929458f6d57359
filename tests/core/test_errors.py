"""The error tree: every error birdflow defines has its place in it, and the drawing shows each."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import birdflow
from birdflow.core import errors
from birdflow.core.errors import BirdflowError, Refused, SettingsError, StateFileError, Unprocessable

MAPPED = ("flows", "ingest_api", "blocks", "deployments")  # folders of the repository installed under birdflow


def defined_errors() -> list[type[BaseException]]:
    """The exception classes the runtime package defines (each module imported)."""
    found = {}
    packages = [birdflow, *(importlib.import_module(f"birdflow.{name}") for name in MAPPED)]
    every = [info for package in packages for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    for module_info in every:
        if module_info.name.endswith("__main__"):
            continue
        module = importlib.import_module(module_info.name)
        for _, value in inspect.getmembers(module, inspect.isclass):
            if issubclass(value, BaseException) and value.__module__ == module.__name__:
                found[value.__qualname__] = value
    return list(found.values())


def test_every_error_birdflow_defines_is_in_the_tree_and_drawn():
    drawing = inspect.getdoc(errors) or ""
    defined = defined_errors()
    assert len(defined) >= 20
    outside = [error.__qualname__ for error in defined if not issubclass(error, BirdflowError)]
    undrawn = [error.__qualname__ for error in defined if error.__qualname__ not in drawing]
    assert not outside, f"not under BirdflowError: {outside}"
    assert not undrawn, f"not in the drawing of birdflow/core/errors.py: {undrawn}"


def test_only_the_audio_and_the_parameters_are_unprocessable():
    from birdflow.core.audio import AudioError
    from birdflow.flows.process_recording import MissingAudio, SourceRefused

    assert all(issubclass(error, Unprocessable) for error in (AudioError, MissingAudio, SourceRefused))
    assert not issubclass(SettingsError, Unprocessable) and not issubclass(StateFileError, Unprocessable)
    assert not issubclass(Refused, Unprocessable)
