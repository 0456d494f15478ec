"""linearize_client: talk to a linearize service over HTTP, apart from the torch engine.

`client` is the typed HTTP client (httpx + the api_schemas models), `commands` the
`linearize submit` and `linearize serve` commands, `options` the compress job's options shared
with the local `linearize compress`. Nothing here imports torch, `linearize`, `service` or
`worker`; the names below load their module on first use, so importing the package (or
`linearize --help`) does not even import httpx.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from linearize_client.client import ApiError, IntegrityError, LinearizeClient

__all__ = ["ApiError", "IntegrityError", "LinearizeClient"]


def __getattr__(name: str):
    if name in __all__:
        from importlib import import_module

        return getattr(import_module("linearize_client.client"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
