"""What the commands share: settings read with errors that name the setting, and argument types."""

from __future__ import annotations

import argparse
from datetime import datetime, timezone

from birdflow.core.listener_ids import validate_listener_id
from birdflow.settings import SettingsError, load_settings


def settings_of(args, reading_only: bool = False):
    """`reading_only`: for a command that only reads the station's tables (no sink's credentials needed)."""
    try:
        return load_settings(args.settings, reading_only=reading_only)
    except SettingsError as exc:
        raise SystemExit(f"birdflow: {exc}") from None


def settings_with_prefect(args):
    """Settings, and this process pointed at their Prefect API (birdflow/app/prefect_env.py)."""
    from birdflow.app.prefect_env import use_prefect

    settings = settings_of(args)
    use_prefect(settings)
    return settings


def require_prefect(settings) -> None:
    """One line instead of Prefect's traceback when its API is not running."""
    from birdflow.app.children import prefect_answers

    if not prefect_answers(settings.api_url, timeout_s=5.0):
        where = "start it with `birdflow up`" if settings.embedded_prefect else "check setting 'prefect_api_url'"
        raise SystemExit(f"birdflow: the Prefect API at {settings.api_url} does not answer: {where}")


def utc_time(text: str) -> datetime:
    """ISO date or time; naive values are UTC."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        example = "e.g. 2025-06-01 or 2025-06-01T05:30"
        raise argparse.ArgumentTypeError(f"not an ISO date/time: {text!r} ({example})") from None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def at_least(minimum: int):
    """An argparse type: an integer of at least `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def listener_id_argument(text: str) -> str:
    try:
        return validate_listener_id(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
