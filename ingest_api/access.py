"""Who may send to the ingest API and who may read its metrics (no HTTP in here).

With `ingest_auth: on` every request carries its listener's token (`Authorization: Bearer <token>` or
`?token=`), except listeners on the `ingest_auth_exempt` list during a migration. /metrics takes the
`metrics_token`; without one it answers loopback clients only once ingest_auth is on.
"""

from __future__ import annotations

import hmac
import time
from ipaddress import ip_address

from birdflow.core.ledger import ProcessedLedger
from birdflow.core.listener_tokens import ListenerTokens
from birdflow.ingest_api.checks import Rejection
from birdflow.settings import Settings


def presented_token(authorization: str | None, query_token: str | None) -> str | None:
    """The token a request carries: the Authorization header's bearer token, else ?token=."""
    if authorization:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    return query_token or None


def _unauthorized(listener_id: str | None) -> Rejection:
    who = f"listener {listener_id!r}" if listener_id else "this request"
    return Rejection(401, "unauthorized", f"missing or invalid token for {who} (see `birdflow listeners add`)")


KNOWN_REFRESH_S = 30.0  # a listener added by `birdflow listeners add` is known this soon


class IngestAccess:
    def __init__(self, settings: Settings, ledger: ProcessedLedger):
        self.required = settings.ingest.ingest_auth == "on"
        self.exempt = frozenset(settings.ingest.ingest_auth_exempt)
        self.metrics_token = settings.observability.metrics_token.get_secret_value()
        self.tokens = ListenerTokens(settings.listener_tokens_file)
        self.ledger = ledger  # its listeners are the ones known, on a station that asks for no token
        self._registered: frozenset[str] = frozenset()
        self._heard: frozenset[str] = frozenset()
        self._registered_at = -KNOWN_REFRESH_S

    def known_listener(self, listener_id: str) -> bool:
        """One of the station's listeners (`birdflow listeners add`, or exempt): what UDP health, which carries
        no token, trusts with gauges and a place in its table. A station that requires no token and has
        registered no one knows the listeners it has recordings of (made-up ids in datagrams are not kept)."""
        now = time.monotonic()
        if now - self._registered_at >= KNOWN_REFRESH_S:
            self._registered = frozenset(record.listener_id for record in self.tokens.listed())
            if not self.required and not self._registered and self.ledger.database.path.exists():
                self._heard = frozenset(self.ledger.listener_ids())
            self._registered_at = now
        if not self.required and not self._registered:
            return listener_id in self._heard
        return listener_id in self._registered or listener_id in self.exempt

    def _owner(self, token: str | None, listener_id: str | None) -> str | None:
        """The listener a presented token belongs to; None when none was presented; 401 for a wrong one."""
        if token is None:
            return None
        owner = self.tokens.listener_of(token)
        if owner is None:
            raise _unauthorized(listener_id)
        return owner

    def admit_stream(self, listener_id: str, token: str | None) -> None:
        if not self.required:
            return
        owner = self._owner(token, listener_id)
        if owner != listener_id and not (owner is None and listener_id in self.exempt):
            raise _unauthorized(listener_id)

    def upload_sender(self, token: str | None) -> str | None:
        """Before an upload's body is read: the listener its token names (None: no token, allowed only
        while some listeners are exempt, whose ids are in the body)."""
        if not self.required:
            return None
        owner = self._owner(token, None)
        if owner is None and not self.exempt:
            raise _unauthorized(None)
        return owner

    def admit_upload(self, sender: str | None, listener_id: str) -> None:
        """After the form is read: the recording must be the token's listener's (or an exempt one's)."""
        if not self.required:
            return
        if sender is None and listener_id not in self.exempt:
            raise _unauthorized(listener_id)
        if sender is not None and sender != listener_id:
            raise Rejection(403, "wrong_listener", f"this token is not listener {listener_id!r}'s")

    def admit_metrics(self, authorization: str | None, client_host: str | None) -> None:
        if self.metrics_token:
            token = presented_token(authorization, None) or ""
            if not hmac.compare_digest(token.encode(), self.metrics_token.encode()):
                raise Rejection(401, "unauthorized", "/metrics needs the metrics token (setting 'metrics_token')")
        elif self.required and not _is_loopback(client_host):
            raise Rejection(
                403, "metrics_remote", "/metrics answers loopback only; set 'metrics_token' to scrape it remotely"
            )


def _is_loopback(host: str | None) -> bool:
    try:
        return ip_address(host or "").is_loopback
    except ValueError:
        return False
