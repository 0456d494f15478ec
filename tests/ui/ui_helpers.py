"""Names shared by the dashboard tests and their fixtures (a module: conftest is not importable)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
SCRIPTS = ("app.js", "charts.js")
KEYS = {"alpha": "alpha-key-5d1e8c", "beta": "beta-key-93ab07"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, interval: float = 0.3, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
