"""Listener tokens: each listener proves who it is with a random token of its own.

Only a token's SHA-256 is stored, so a copy of the file lets nobody send as a listener. A listener may hold
several tokens at once, which is how a token is rotated: add a new one, put it on the listener, revoke the
old one by its id (the first 12 hex digits of its hash, shown by `birdflow listeners list`).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from birdflow.core.local_db import LocalDatabase

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS tokens (token_id TEXT PRIMARY KEY, listener_id TEXT NOT NULL,"
    " token_hash TEXT NOT NULL, created_at INTEGER NOT NULL)"
)
TOKEN_ID_DIGITS = 12
TOKEN_BYTES = 32  # 43 URL-safe characters: fits a query string as it is


@dataclass(frozen=True)
class TokenRecord:
    token_id: str
    listener_id: str
    created_at: int


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class ListenerTokens:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.database = LocalDatabase(self.path, [SCHEMA])

    def add(self, listener_id: str) -> str:
        """A new token for the listener (its others stay valid); the token itself is never stored."""
        token = secrets.token_urlsafe(TOKEN_BYTES)
        digest = _hash(token)
        self.database.execute(
            "INSERT INTO tokens VALUES (?, ?, ?, ?)", (digest[:TOKEN_ID_DIGITS], listener_id, digest, int(time.time()))
        )
        os.chmod(self.path, 0o600)
        return token

    def listed(self) -> list[TokenRecord]:
        rows = self.database.execute(
            "SELECT token_id, listener_id, created_at FROM tokens ORDER BY listener_id, created_at"
        )
        return [TokenRecord(*row) for row in rows]

    def revoke(self, listener_id: str, token_id: str | None = None) -> int:
        """Revoke one token of the listener (by id or its prefix), or all of them; returns how many."""
        if token_id:
            cursor = self.database.execute(
                "DELETE FROM tokens WHERE listener_id = ? AND token_id LIKE ? || '%'", (listener_id, token_id.lower())
            )
        else:
            cursor = self.database.execute("DELETE FROM tokens WHERE listener_id = ?", (listener_id,))
        return cursor.rowcount

    def listener_of(self, token: str) -> str | None:
        """The listener a token belongs to, or None. The stored hash is compared in constant time; the
        lookup by the hash's first digits tells an attacker nothing about any token."""
        digest = _hash(token)
        row = self.database.execute(
            "SELECT listener_id, token_hash FROM tokens WHERE token_id = ?", (digest[:TOKEN_ID_DIGITS],)
        ).fetchone()
        if row is None or not hmac.compare_digest(row[1], digest):
            return None
        return row[0]
