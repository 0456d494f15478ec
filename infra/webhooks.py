"""Webhooks on terminal states, delivered from the outbox in the job store.

The job's final state and its outbox entry are written in one transaction (infra.store); the
dispatcher (a thread in each API process, service.outbox) posts what is due and schedules the
retries after LINEARIZE_WEBHOOK_RETRY_DELAYS_S. No broker is involved, so a webhook survives the
broker being down when the job finishes. The job object is POSTed with Standard Webhooks headers:
`webhook-signature: v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`, where the key is
the base64 part of a `whsec_...` secret (any other secret is used as raw UTF-8 bytes). The
webhook-id is stable across retries so receivers can drop duplicates.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time
from datetime import timedelta
from urllib.parse import urlsplit

import httpx

from infra.db import OutboxRow, utcnow
from infra.settings import Settings
from infra.store import Store, job_to_schema

log = logging.getLogger(__name__)


def secret_bytes(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_"))
    return secret.encode("utf-8")


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_bytes(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def allowed(url: str, settings: Settings) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    return host in {h.lower() for h in settings.webhook_allowed_hosts}


def dispatch_due(store: Store, settings: Settings) -> int:
    """Deliver every outbox entry that is due; returns how many were delivered."""
    delivered = 0
    for entry in store.due_webhooks(utcnow()):
        delivered += deliver_entry(store, settings, entry)
    return delivered


def deliver_entry(store: Store, settings: Settings, entry: OutboxRow) -> bool:
    """One attempt, if this dispatcher wins the entry; True when the receiver answered 2xx."""
    # Held past the request's own timeout so no other dispatcher posts the same attempt.
    hold = utcnow() + timedelta(seconds=settings.webhook_timeout_s + 30)
    if not store.take_webhook(entry, hold):
        return False
    row = store.get_job(entry.job_id)
    if row is None or not allowed(entry.url, settings):
        # The allow-list may have shrunk since submit; never post to a host it no longer names.
        log.warning("webhook of %s not sent: job gone or host no longer allowed", entry.job_id)
        store.record_webhook_outcome(entry, delivered=False, error="not allowed", retry_at=None)
        return False
    ok, error = _post(entry.url, job_to_schema(row, settings.public_base_url), entry, settings)
    delays = settings.webhook_retry_delays_s
    retry_at = None
    if not ok and entry.attempts < len(delays):  # entry.attempts: tries before this one
        retry_at = utcnow() + timedelta(seconds=delays[entry.attempts])
    store.record_webhook_outcome(entry, delivered=ok, error=error, retry_at=retry_at)
    msg_id = _message_id(entry)
    outcome = "delivered" if ok else ("failed" if retry_at else "given up")
    store.add_event(entry.job_id, "log", f"webhook {outcome}", data={"webhook_id": msg_id})
    return ok


def _message_id(entry: OutboxRow) -> str:
    return f"msg_{entry.job_id}_{entry.job_status}"


def _post(url: str, job, entry: OutboxRow, settings: Settings) -> tuple[bool, str | None]:
    body = job.model_dump_json().encode()
    msg_id = _message_id(entry)
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "user-agent": "linearize-webhooks",
    }
    if settings.webhook_secret:
        headers["webhook-signature"] = sign(settings.webhook_secret, msg_id, timestamp, body)
    try:
        response = httpx.post(
            url,
            content=body,
            headers=headers,
            timeout=settings.webhook_timeout_s,
            follow_redirects=False,
        )
    except httpx.HTTPError as exc:
        log.info("webhook for %s failed: %s", entry.job_id, exc)
        return False, f"{type(exc).__name__}: {exc}"
    if 200 <= response.status_code < 300:
        return True, None
    log.info("webhook for %s answered %s", entry.job_id, response.status_code)
    return False, f"HTTP {response.status_code}"
