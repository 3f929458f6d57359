"""/clips/...: a detection's archived clip (FLAC) or spectrogram (PNG) for a browser that holds a signed link, such
as the review form's. No token: the link's signature and expiry are the permission (birdflow.core.links)."""

from __future__ import annotations

import time
from pathlib import PurePosixPath

from fastapi import APIRouter
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from birdflow.core.links import link_is_valid
from birdflow.ingest_api.checks import Rejection
from birdflow.ingest_api.deps import IngestStateDep

router = APIRouter()
MEDIA_TYPES = {".flac": "audio/flac", ".png": "image/png"}
LONGEST_KEY = 512


@router.get("/clips/{key:path}")
async def clip(key: str, ingest: IngestStateDep, expires: int = 0, signature: str = "") -> Response:
    path = f"/clips/{key}"
    media_type = MEDIA_TYPES.get(PurePosixPath(key).suffix)
    try:
        if media_type is None or len(key) > LONGEST_KEY or ".." in key.split("/"):
            raise Rejection(404, "no_such_clip", "no such clip (links name a .flac or .png under /clips/)")
        if not link_is_valid(ingest.link_key, path, expires, signature, time.time()):
            raise Rejection(
                403,
                "clip_link",
                "this clip link has expired or was not signed by this station: open the review again for a new one",
            )
        data = await run_in_threadpool(ingest.clip_archive.fetch, path.removeprefix("/"))
        if data is None:
            raise Rejection(404, "no_such_clip", "the clip is no longer in the archive (its retention removed it)")
    except Rejection as rejection:
        return ingest.reject(rejection, None)
    return Response(
        data,
        media_type=media_type,
        headers={
            "Cache-Control": "private, max-age=3600",
            "Content-Disposition": f'inline; filename="{PurePosixPath(key).name}"',
        },
    )
