"""Reading the settings: ``settings.yaml`` (flat lower-case keys) overridden by upper-case environment
variables, a `.env` file in the working directory counting as environment (the real environment wins).

Booleans are ``true/false`` in YAML and ``0/1`` (or ``true/false``) in the environment; lists are YAML
lists or comma-separated environment values. An invalid value stops the program with a message that names
the setting and where its value came from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from dotenv import dotenv_values
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from birdflow.settings.model import SECTIONS, Settings
from birdflow.settings.sections import SettingsError

SETTINGS_FILE_ENV = "BIRDFLOW_SETTINGS"
EMPTY_MEANS_NONE = ("latitude", "longitude", "archive_dir", "mqtt_ca_file")


def _env_value(name: str, raw: str, annotation: Any) -> Any:
    """Environment values are strings, which pydantic parses (booleans as 0/1, true/false, yes/no, on/off); an
    empty one is false for a switch and unset for an optional place or coordinate."""
    if raw == "" and (annotation is bool or annotation == "bool"):
        return False
    if raw == "" and name in EMPTY_MEANS_NONE:
        return None
    return raw


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a .env file, read as pydantic-settings reads one (python-dotenv), without expanding
    `$`: secrets are taken as written."""
    return {key: value or "" for key, value in dotenv_values(path, interpolate=False).items()}


def _yaml_values(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise SettingsError(f"settings file {file} does not exist")
    try:
        loaded = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SettingsError(f"settings file {file} is not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise SettingsError(f"settings file {file} must be a mapping of setting: value")
    return {str(key): value for key, value in loaded.items()}


def _environment() -> dict[str, str]:
    """The process environment over ./.env (what the settings read when not given an environment)."""
    return {**(read_env_file(Path(".env")) if Path(".env").is_file() else {}), **os.environ}


def settings_file_in_use(
    path: os.PathLike | str | None = None, environ: Mapping[str, str] | None = None
) -> Path | None:
    """The settings file load_settings reads: the one given, else BIRDFLOW_SETTINGS, else ./settings.yaml if any."""
    environ = _environment() if environ is None else environ
    path = path or environ.get(SETTINGS_FILE_ENV)
    if path is None and Path("settings.yaml").is_file():
        path = "settings.yaml"
    return Path(path) if path is not None else None


def load_settings(path: os.PathLike | str | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read settings.yaml (if any) and apply upper-case environment overrides, validating everything."""
    environ = _environment() if environ is None else environ
    path = settings_file_in_use(path, environ)
    values = _yaml_values(path) if path is not None else {}
    source = {name: f"in {path}" for name in values}
    for name, field in Settings.flat_fields().items():
        if name.upper() in environ:
            values[name] = _env_value(name, environ[name.upper()], field.annotation)
            source[name] = f"env {name.upper()}"
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise SettingsError("; ".join(_problem(error, source) for error in exc.errors())) from None


def _problem(error: ErrorDetails, source: dict[str, str]) -> str:
    """One validation error as "setting 'name' (where its value came from): what is wrong"."""
    message = error["msg"].removeprefix("Value error, ")
    location = [str(part) for part in error["loc"]]
    if location and location[0] in SECTIONS:
        location = location[1:]  # sections are how the settings are kept, not how they are named
    if not location:
        return message  # a check across settings, whose message names them
    name = ".".join(location)
    if error["type"] == "extra_forbidden":
        message = "unknown setting (the settings.yaml that `birdflow init` writes lists every valid name)"
    return f"setting '{name}' ({source.get(location[0], 'default')}): {message}"
