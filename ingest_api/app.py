"""The HTTP face of the aggregator: the listener protocol's two endpoints, /healthz, /metrics, and the clips that
signed links (review forms) open.

A router per endpoint family (ingest_api/routes/); what they share lives in one IngestState per app;
what an upload must be is checked in ingest_api/checks.py and frames become recordings in assembler.py,
neither of which knows HTTP."""

from __future__ import annotations

from fastapi import FastAPI

from birdflow.ingest_api.ingest_state import IngestState
from birdflow.ingest_api.routes import clips, health, streams, uploads
from birdflow.settings import Settings


def create_app(settings: Settings) -> FastAPI:
    ingest = IngestState(settings)
    # no redirect to the same path with a slash: it would be built from the request's Host header
    # no /docs, /redoc or /openapi.json: the protocol is docs/listener-protocol.md, and a stranger learns nothing
    app = FastAPI(
        title="birdflow ingest API",
        version="1",
        lifespan=ingest.lifespan,
        redirect_slashes=False,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.ingest = ingest
    for routes in (streams, uploads, health, clips):
        app.include_router(routes.router)
    return app
