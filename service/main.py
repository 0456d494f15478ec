"""The FastAPI app: `uvicorn service.main:app`. Never imports torch or the engine."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from importlib import metadata

from fastapi import FastAPI

from infra.db import init_schema, make_engine
from infra.migrate import SchemaMismatch
from infra.objectstore import ArtifactStoreError, artifact_store
from infra.settings import Settings, get_settings
from infra.store import Store
from service.auth import key_hashes
from service.broker import Broker, Reconciler
from service.deps import AppState
from service.metrics import make_registry
from service.outbox import WebhookDispatcher
from service.routers import datasets, health, jobs, ui

log = logging.getLogger(__name__)

DESCRIPTION = """\
Submit compression and analysis jobs for transformer checkpoints, follow their progress, and
download the report and the compressed checkpoint. Authenticate with `Authorization: Bearer <key>`.
"""


def _version() -> str:
    try:
        return metadata.version("linearize")
    except metadata.PackageNotFoundError:
        return "0.0.0"


class _LatencyMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware): adds no task switch to every request."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status_code = 500

        async def send_status(message):
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            histogram = getattr(scope["app"].state, "http_latency", None)
            if histogram is not None:
                histogram.labels(
                    scope["method"], getattr(route, "path", "unmatched"), str(status_code)
                ).observe(time.perf_counter() - start)


def create_app(settings: Settings | None = None, *, reconcile: bool = True) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        config = settings or get_settings()
        engine = make_engine(config.resolved_database_url)
        try:
            init_schema(engine)
        except SchemaMismatch as exc:
            # Never serve on a store of another schema: writes could lose or corrupt history.
            log.critical("API not started: %s", exc)
            engine.dispose()
            raise
        artifacts = artifact_store(config)
        try:
            artifacts.check()
        except ArtifactStoreError as exc:
            # Keep serving: /readyz says what is wrong, and the store may come back.
            log.error("artifact store not usable: %s", exc)
        store = Store(engine)
        broker = Broker(config)
        broker.warm_up()
        state = AppState(config, store, broker, key_hashes(config), artifacts)
        app.state.linearize = state
        app.state.metrics_registry, app.state.http_latency = make_registry(state)
        reconciler = Reconciler(config, store, broker, artifacts)
        dispatcher = WebhookDispatcher(config, store)
        if reconcile:
            reconciler.start()
            dispatcher.start()
        try:
            yield
        finally:
            dispatcher.stop()
            reconciler.stop()
            broker.close()
            engine.dispose()

    app = FastAPI(
        title="linearize",
        version=_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.add_middleware(_LatencyMiddleware)
    app.include_router(health.router)
    app.include_router(datasets.router)
    app.include_router(jobs.router)
    app.include_router(ui.router)
    return app


app = create_app()
