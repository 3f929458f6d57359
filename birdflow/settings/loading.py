"""Reading the settings: ``settings.yaml`` (flat lower-case keys) overridden by upper-case environment
variables, a `.env` file in the working directory counting as environment (the real environment wins).

Booleans are ``true/false`` in YAML and ``0/1`` (or ``true/false``) in the environment; lists are YAML
lists or comma-separated environment values. An invalid value stops the program with a message that names
the setting and where its value came from.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from dotenv import dotenv_values
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from birdflow.settings.model import SECTIONS, Settings
from birdflow.settings.sections import READING_ONLY, SettingsError

SETTINGS_FILE_ENV = "BIRDFLOW_SETTINGS"
EMPTY_MEANS_NONE = ("latitude", "longitude", "archive_dir", "mqtt_ca_file")
# an old name -> the setting it sets now, and what a reader of the old name should know
RENAMED = {
    "confirm_window_s": (
        "rare_confirm_window_s",
        "'confirm_window_s' named two windows and set only the one of two stations' rare sightings; "
        "the window of confirm_count within one recording is 'confirm_count_window_s'",
    ),
}
log = logging.getLogger("birdflow.settings")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (YAML itself keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                hint = f" ({RENAMED[key][1]})" if key in RENAMED else ""
                raise SettingsError(
                    f"setting '{key}' is written twice, on lines {seen[key]} and {line}: keep one{hint}"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


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
        loaded = yaml.load(file.read_text(), Loader=_UniqueKeyLoader) or {}
    except SettingsError as exc:
        raise SettingsError(f"settings file {file}: {exc}") from None
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


def load_settings(
    path: os.PathLike | str | None = None, environ: Mapping[str, str] | None = None, reading_only: bool = False
) -> Settings:
    """Read settings.yaml (if any) and apply upper-case environment overrides, validating everything;
    `reading_only`: for a command that only reads the station's tables, which needs no sink's credentials."""
    environ = _environment() if environ is None else environ
    path = settings_file_in_use(path, environ)
    values = _yaml_values(path) if path is not None else {}
    source = {name: f"in {path}" for name in values}
    for old in RENAMED:
        if old.upper() in environ:
            values[old], source[old] = environ[old.upper()], f"env {old.upper()}"
    for name, field in Settings.flat_fields().items():
        if name.upper() in environ:
            values[name] = _env_value(name, environ[name.upper()], field.annotation)
            source[name] = f"env {name.upper()}"
    _take_renamed(values, source)
    try:
        return Settings.model_validate(values, context={READING_ONLY: reading_only})
    except ValidationError as exc:
        raise SettingsError("; ".join(_problem(error, source) for error in exc.errors())) from None


def _take_renamed(values: dict[str, Any], source: dict[str, str]) -> None:
    """A setting given by its old name is read as the new one, with a line that says so; both names at once
    contradict each other and stop the station."""
    for old, (new, what) in RENAMED.items():
        if old not in values:
            continue
        if new in values:
            raise SettingsError(
                f"setting '{old}' ({source[old]}) and setting '{new}' ({source[new]}) are one setting: "
                f"keep '{new}' ({what})"
            )
        values[new], source[new] = values.pop(old), source.pop(old)
        log.warning("setting '%s' (%s) is read as '%s': %s", old, source[new], new, what)


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
