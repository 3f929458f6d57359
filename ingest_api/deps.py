"""Dependencies of the routes: the app's IngestStation, and the token a request carries."""

from __future__ import annotations

from typing import Annotated, Optional

from fastapi import Depends, Query, Request

from ingest_api.access import presented_token
from ingest_api.station import IngestStation


def get_station(request: Request) -> IngestStation:
    return request.app.state.station


def get_token(request: Request, token: Optional[str] = Query(None)) -> Optional[str]:
    return presented_token(request.headers.get("authorization"), token)


StationDep = Annotated[IngestStation, Depends(get_station)]
TokenDep = Annotated[Optional[str], Depends(get_token)]
