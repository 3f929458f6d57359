"""What a listener id may be: ids become file and folder names, so nothing that could name another path."""

from __future__ import annotations

import re

LISTENER_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,63}")  # matched in full (fullmatch)


def validate_listener_id(listener_id: str) -> str:
    """The id itself, or ValueError saying what is wrong with it."""
    if not LISTENER_ID_PATTERN.fullmatch(listener_id or ""):
        raise ValueError(
            f"invalid listener id {listener_id!r}: use 1-64 letters, digits, '.' or '-' (no '/', '_', '..' or NUL)"
        )
    if ".." in listener_id:
        raise ValueError(f"invalid listener id {listener_id!r}: '..' is not allowed")
    return listener_id
