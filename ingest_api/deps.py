"""Dependencies of the routes: the app's IngestState, and the token a request carries."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request

from birdflow.ingest_api.access import presented_token
from birdflow.ingest_api.ingest_state import IngestState


def get_ingest_state(request: Request) -> IngestState:
    return request.app.state.ingest


def get_token(request: Request, token: str | None = Query(None)) -> str | None:
    return presented_token(request.headers.get("authorization"), token)


IngestStateDep = Annotated[IngestState, Depends(get_ingest_state)]
TokenDep = Annotated[str | None, Depends(get_token)]
