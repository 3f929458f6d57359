"""What birdflow borrows from uvicorn beyond its documented surface: its httptools protocol, subclassed by the
ingest API to put a deadline on every stage of a request (ingest_api/connections.py), which uvicorn's settings
cannot. BORROWED lists what the subclass relies on; tests/runtime/test_internals.py checks each name."""

from __future__ import annotations

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from birdflow.runtime.borrowed import Borrowed, check_tested

TESTED_UVICORN = ((0, 55), (0, 56))

PROTOCOL = "uvicorn.protocols.http.httptools_impl:HttpToolsProtocol"
BORROWED: tuple[Borrowed, ...] = (
    Borrowed(
        PROTOCOL,
        "uvicorn waits forever for headers and bodies: slow connections piled up until file descriptors ran out",
        calls=("config", "server_state", "app_state"),
        sets=("transport", "loop", "scope", "client", "flow", "cycle"),
    ),
    Borrowed(f"{PROTOCOL}.connection_made", "the header deadline starts", calls=("transport",)),
    Borrowed(
        f"{PROTOCOL}.data_received",
        "header bytes counted: more than 64 KiB get 431; trailers and chunk framing bounded too",
        calls=("data",),
    ),
    Borrowed(f"{PROTOCOL}.on_message_begin", "the next request's header deadline"),
    Borrowed(f"{PROTOCOL}.on_headers_complete", "the body's, or a stream's first frame's, deadline"),
    Borrowed(f"{PROTOCOL}.on_body", "activity moves the deadline on", calls=("body",)),
    Borrowed(f"{PROTOCOL}.on_response_complete", "a refused body is drained for a bounded time"),
    Borrowed(f"{PROTOCOL}.on_message_complete", "the keep-alive timeout takes over"),
    Borrowed(f"{PROTOCOL}.connection_lost", "the deadline timer goes", calls=("exc",)),
    Borrowed(
        "uvicorn.protocols.http.flow_control:FlowControl",
        "a paused read is the app being slow, not the client",
        sets=("read_paused",),
    ),
    Borrowed(
        "uvicorn.protocols.http.httptools_impl:RequestResponseCycle",
        "a response sent before its request's body was read (a refusal), or none yet",
        sets=("more_body", "response_started"),
    ),
)

__all__ = ["BORROWED", "TESTED_UVICORN", "HttpToolsProtocol"]

check_tested(__name__, "uvicorn", uvicorn.__version__, TESTED_UVICORN)
