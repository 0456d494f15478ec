"""Typed FastAPI dependencies: settings, store, broker, and the caller's tenant."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

from cachetools import TTLCache
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from infra.objectstore import ArtifactStore
from infra.settings import Settings
from infra.store import Store
from service.auth import tenant_for_key
from service.broker import Broker

LOOKUP_TTL_S = 2.0


@dataclass
class AppState:
    settings: Settings
    store: Store
    broker: Broker
    key_hashes: dict[str, str]
    artifacts: ArtifactStore
    # What every submit checks and that changes rarely (a model's files, a tenant's dataset,
    # the live workers): read once per LOOKUP_TTL_S, not once per request. Each read is a
    # query or a directory listing, and at 50 clients they were a third of a submit's work.
    _lookups: TTLCache = field(
        default_factory=lambda: TTLCache(maxsize=4096, ttl=LOOKUP_TTL_S), repr=False
    )
    _lookups_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def recent(self, key: tuple, read: Callable[[], object]) -> object:
        """read(), or its value from the last LOOKUP_TTL_S; None and errors are not kept (a
        dataset uploaded a moment ago must be found by the next submit)."""
        with self._lookups_lock:
            if key in self._lookups:
                return self._lookups[key]
        value = read()
        if value is not None:
            with self._lookups_lock:
                self._lookups[key] = value
        return value


# Dependencies that do no I/O are `async def`: FastAPI runs a sync dependency in the thread
# pool, and two extra thread hops per request showed up in the latency benchmark.
async def get_state(request: Request) -> AppState:
    return request.app.state.linearize


StateDep = Annotated[AppState, Depends(get_state)]

_bearer = HTTPBearer(auto_error=False, description="An API key from LINEARIZE_API_KEYS.")


async def get_tenant(
    state: StateDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    tenant = None
    if credentials is not None and credentials.scheme.lower() == "bearer":
        tenant = tenant_for_key(state.key_hashes, credentials.credentials)
    if tenant is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or invalid API key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return tenant


TenantDep = Annotated[str, Depends(get_tenant)]


async def bearer_token(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str | None:
    if credentials is None or credentials.scheme.lower() != "bearer":
        return None
    return credentials.credentials


def unprocessable(field: str | list[str], message: str) -> HTTPException:
    """A 422 shaped like FastAPI's own validation errors, so clients parse one format."""
    loc = ["body", *([field] if isinstance(field, str) else field)]
    return HTTPException(
        status.HTTP_422_UNPROCESSABLE_CONTENT,
        [{"loc": loc, "msg": message, "type": "value_error"}],
    )
