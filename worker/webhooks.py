"""The Celery side of webhooks: the `send_webhook` task of releases before the outbox.

Terminal states now write an outbox entry (infra.webhooks); messages still in the webhook queue
from an older release deliver the job's pending entries through the same code.
"""

from __future__ import annotations

from infra.settings import get_settings
from infra.webhooks import deliver_entry, secret_bytes, sign

__all__ = ["deliver", "secret_bytes", "sign"]


def deliver(job_id: str) -> bool:
    """Every pending outbox entry of the job, once; True when nothing is left to retry."""
    from worker.runner import worker_store

    store = worker_store()
    settings = get_settings()
    results = [deliver_entry(store, settings, entry) for entry in store.pending_webhooks(job_id)]
    return all(results)
