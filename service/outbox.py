"""The webhook outbox dispatcher: a thread in each API process (several may run at once; the
outbox's compare-and-set on the attempt count lets one of them post each attempt)."""

from __future__ import annotations

import logging
import threading

from infra.settings import Settings
from infra.store import Store
from infra.webhooks import dispatch_due

log = logging.getLogger(__name__)


class WebhookDispatcher:
    def __init__(self, settings: Settings, store: Store):
        self.settings, self.store = settings, store
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.webhook_timeout_s + 5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                dispatch_due(self.store, self.settings)
            except Exception:  # the database may be away for a moment; the entries stay due
                log.exception("webhook dispatch pass failed")
            self._stop.wait(self.settings.webhook_dispatch_interval_s)
