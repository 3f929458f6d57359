"""/healthz for probes and /metrics for Prometheus."""

from __future__ import annotations

import shutil

from fastapi import APIRouter, Request
from fastapi.responses import Response

from birdflow.app import metrics
from ingest_api.checks import Rejection
from ingest_api.deps import StationDep

router = APIRouter()


@router.get("/healthz")
def healthz(station: StationDep) -> dict:
    return {"status": "ok", "station_id": station.station_id}


@router.get("/metrics")
def prometheus_metrics(request: Request, station: StationDep) -> Response:
    try:
        station.access.admit_metrics(request.headers.get("authorization"), request.client.host if request.client else None)
    except Rejection as rejection:
        return station.reject(rejection, None)
    metrics.DISK_FREE.labels(station.station_id).set(shutil.disk_usage(station.settings.data_dir).free)
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)
