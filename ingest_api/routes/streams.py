"""POST /recordings_stream: one listener's frames for as long as its connection lasts (the protocol
document, section 1); the frames become recordings in ingest_api/assembler.py."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from functools import partial

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from birdflow.core.disk import InsufficientStorage
from birdflow.ingest_api.assembler import StreamAssembler, StreamRejected, StreamStats, TooManyRecordings
from birdflow.ingest_api.checks import Rejection, write_failure
from birdflow.ingest_api.connections import FIRST_FRAME_SEEN
from birdflow.ingest_api.deps import IngestStateDep, TokenDep
from birdflow.ingest_api.framing import FrameParser, FramingError
from birdflow.ingest_api.ingest_state import RETRY_AFTER_S
from birdflow.runtime import metrics

log = logging.getLogger("birdflow.ingest")
router = APIRouter()


def summary(listener_id: str, stats: StreamStats) -> dict:
    return {
        "listener_id": listener_id,
        "recordings_closed": stats.closed,
        "recordings": [info.recording_id for info in stats.recordings],  # the newest 100
        "discarded": stats.discarded,
        "gaps": stats.gaps,
        "dropped_frames": stats.dropped_frames,
        "metadata_frames": stats.metadata_frames,
    }


@router.post("/recordings_stream")
async def recordings_stream(request: Request, ingest: IngestStateDep, token: TokenDep, listener_id: str = Query(...)):
    try:
        ingest.admit_stream(listener_id, token)
    except Rejection as refused:
        return ingest.reject(refused, listener_id)
    parser = FrameParser(ingest.settings.ingest.max_frame_bytes)
    sealing: list[concurrent.futures.Future] = []

    def seal_later(seal) -> None:
        sealing[:] = [future for future in sealing if not future.done()]  # bounded on days-long streams
        sealing.append(ingest.submit_seal(listener_id, seal))

    assembler = StreamAssembler(
        listener_id,
        ingest.store,
        ingest.limits,
        on_event=ingest.count_event,
        sealer=seal_later,
        before_open=partial(ingest.admit_next_recording, listener_id, token, time.monotonic()),
        rate=ingest.recording_rate,
    )
    ingest.streams.add(assembler)
    open_streams = metrics.OPEN_STREAMS.labels(ingest.station_id)
    open_streams.inc()
    rejection: Rejection | None = None
    stopping = False
    try:
        async for chunk in request.stream():
            for frame in parser.feed(chunk):
                assembler.handle(frame)
                request.scope[FIRST_FRAME_SEEN] = True
    except ClientDisconnect:
        log.info("listener %s disconnected", listener_id)
    except asyncio.CancelledError:
        # the server is stopping and ends the streams: the recording in progress is closed and kept below;
        # a listener that reads its socket gets "come back later", with what was kept, not a reset
        log.info("listener %s: stream closed because the ingest API is stopping", listener_id)
        stopping = True
    except FramingError as exc:
        rejection = Rejection(400, "malformed_frame", str(exc))
    except StreamRejected as exc:
        rejection = Rejection(415, "bad_header", str(exc))
    except TooManyRecordings as exc:
        rejection = Rejection(429, "too_many_recordings", str(exc))
    except InsufficientStorage as exc:  # checked as each recording opens; the ones before it are kept
        rejection = Rejection(507, "insufficient_storage", str(exc))
    except Rejection as exc:  # a token revoked, or a stream past its lifetime, as a recording opens
        rejection = exc
    except OSError as exc:
        assembler.abandon()  # a recording cut by a write error is not kept half-written
        failure = write_failure(exc)
        if not isinstance(failure, Rejection):
            raise
        rejection = failure
    finally:
        if parser.pending_bytes and rejection is None:
            log.info("listener %s: stream ended inside a frame (%d bytes dropped)", listener_id, parser.pending_bytes)
            ingest.count_event("frame_dropped", 1)
        stats = assembler.finish()
        ingest.streams.discard(assembler)
        open_streams.dec()
        # this stream's recordings are published before its answer lists them
        await asyncio.gather(*(asyncio.wrap_future(future) for future in sealing), return_exceptions=True)
    if stopping:  # the recordings it lists are kept: a listener resends only what came after them
        return JSONResponse(
            {"error": "the ingest API is stopping: send again what is not listed", **summary(listener_id, stats)},
            status_code=503,
            headers={"Retry-After": RETRY_AFTER_S[503]},
        )
    if rejection:
        return ingest.reject(rejection, listener_id, summary(listener_id, stats))
    return summary(listener_id, stats)
