"""/healthz for probes and /metrics for Prometheus."""

from __future__ import annotations

import shutil

from fastapi import APIRouter, Request
from fastapi.responses import Response

from birdflow.ingest_api.checks import Rejection
from birdflow.ingest_api.deps import IngestStateDep
from birdflow.runtime import metrics
from birdflow.runtime.state_files import damaged_copies

router = APIRouter()


@router.get("/healthz")
def healthz(ingest: IngestStateDep) -> dict:
    """Up; and, while a damaged state file's copy is kept, which files were rebuilt (analysis goes on)."""
    health: dict = {"status": "ok", "station_id": ingest.station_id}
    if damaged := damaged_copies(ingest.settings.state_dir):
        health["state_files_rebuilt"] = [{"file": copy.file, "kept_as": copy.kept_as} for copy in damaged]
    return health


@router.get("/metrics")
def prometheus_metrics(request: Request, ingest: IngestStateDep) -> Response:
    try:
        ingest.access.admit_metrics(
            request.headers.get("authorization"), request.client.host if request.client else None
        )
    except Rejection as rejection:
        return ingest.reject(rejection, None)
    metrics.DISK_FREE.labels(ingest.station_id).set(shutil.disk_usage(ingest.settings.data_dir).free)
    metrics.STATE_FILES_DAMAGED.labels(ingest.station_id).set(len(damaged_copies(ingest.settings.state_dir)))
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)
