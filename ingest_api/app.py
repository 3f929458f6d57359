"""The HTTP face of the aggregator: the listener protocol's two endpoints, /healthz and /metrics.

A router per endpoint family (ingest_api/routes/); what they share lives in one IngestStation per app;
what an upload must be is checked in ingest_api/checks.py and frames become recordings in assembler.py,
neither of which knows HTTP."""

from __future__ import annotations

from fastapi import FastAPI

from birdflow.settings import Settings
from ingest_api.routes import health, streams, uploads
from ingest_api.station import IngestStation


def create_app(settings: Settings) -> FastAPI:
    station = IngestStation(settings)
    # no redirect to the same path with a slash: it would be built from the request's Host header
    app = FastAPI(title="birdflow ingest API", version="1", lifespan=station.lifespan, redirect_slashes=False)
    app.state.station = station
    for routes in (streams, uploads, health):
        app.include_router(routes.router)
    return app
