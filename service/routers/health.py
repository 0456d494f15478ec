"""Liveness, readiness (broker, database, a worker heartbeat) and Prometheus metrics."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from infra.objectstore import ArtifactStoreError
from service.deps import StateDep, bearer_token

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process answers; says nothing about its dependencies."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    responses={503: {"description": "Broker, database, workers or artifact store missing."}},
)
async def readyz(state: StateDep, response: Response) -> dict[str, object]:
    def check() -> dict[str, object]:
        try:
            with state.store.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            database = True
        except Exception:
            database = False
        workers = (
            len(state.store.alive_workers(3 * state.settings.worker_heartbeat_s)) if database else 0
        )
        checks: dict[str, object] = {
            "broker": state.broker.ping(),
            "database": database,
            "workers": workers,
            "artifacts": True,
        }
        try:
            state.artifacts.check()
        except ArtifactStoreError as exc:
            checks["artifacts"] = False
            checks["artifacts_error"] = str(exc)
        return checks

    checks = await run_in_threadpool(check)
    ready = bool(
        checks["broker"] and checks["database"] and checks["workers"] and checks["artifacts"]
    )
    if not ready:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return {"status": "ready" if ready else "not ready", "checks": checks}


async def require_metrics_key(
    state: StateDep, token: Annotated[str | None, Depends(bearer_token)]
) -> None:
    """Prometheus practice: the scrape carries its own credential (`authorization` in the scrape
    config). Without LINEARIZE_METRICS_KEY nobody may read the counts."""
    expected = state.settings.metrics_key
    if not expected or token is None or not hmac.compare_digest(token, expected):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "/metrics needs `Authorization: Bearer <LINEARIZE_METRICS_KEY>`"
            + ("" if expected else " (the key is not set on this server)"),
            headers={"WWW-Authenticate": "Bearer"},
        )


@router.get(
    "/metrics",
    response_class=Response,
    dependencies=[Depends(require_metrics_key)],
    responses={
        200: {"content": {"text/plain": {}}},
        401: {"description": "Missing or wrong metrics key."},
    },
)
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics_registry
    body = await run_in_threadpool(generate_latest, registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
