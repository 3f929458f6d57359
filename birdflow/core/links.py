"""Links a browser can open without a token: a path of the station and an expiry time, signed with the station's
link key (HMAC-SHA256). The review form links a clip so; the ingest API checks the signature before it serves it.
Whoever holds a link may fetch that one object until it expires, nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from urllib.parse import urlencode

from birdflow.core.errors import StateFileError

KEY_BYTES = 32
SIGNATURE_HEX = 32  # 128 bits of the HMAC: unguessable, and a link short enough to read


class LinkKeyError(StateFileError):
    """The station's link key cannot be read or made (its folder is not writable, or the file is damaged)."""


def link_key(path: Path) -> bytes:
    """The station's link key, made on first use (random, readable by its owner only). Every process of the
    station (executor, worker, ingest API) reads the same file under the data folder."""
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    # a name of its own per attempt: the worker's run threads share a process id
    made = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    try:
        descriptor = os.open(made, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(secrets.token_bytes(KEY_BYTES))
            file.flush()
            os.fsync(file.fileno())
        os.link(made, path)  # fails if another process made it first: then theirs is the key
    except FileExistsError:
        pass
    except OSError as exc:
        raise LinkKeyError(f"cannot make the link key {path}: {exc}") from exc
    finally:
        made.unlink(missing_ok=True)
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise LinkKeyError(f"the link key {path} is damaged ({len(key)} bytes, not {KEY_BYTES}): delete it")
    return key


def signature(key: bytes, path: str, expires: int) -> str:
    return hmac.new(key, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()[:SIGNATURE_HEX]


def signed_link(base_url: str, path: str, key: bytes, expires: int) -> str:
    """`base_url` + `path` (which starts with /), valid until `expires` (epoch seconds)."""
    query = urlencode({"expires": expires, "signature": signature(key, path, expires)})
    return f"{base_url.rstrip('/')}{path}?{query}"


def link_is_valid(key: bytes, path: str, expires: int, given: str, now: float) -> bool:
    return now <= expires and hmac.compare_digest(signature(key, path, expires), given)
