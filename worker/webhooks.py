"""Webhooks on terminal states: the job object POSTed with Standard Webhooks signatures.

Signature: `webhook-signature: v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`, where the
key is the base64 part of a `whsec_...` secret (any other secret is used as raw UTF-8 bytes).
The webhook-id is stable across retries so receivers can drop duplicates.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time
from urllib.parse import urlsplit

import httpx

from api_schemas.jobs import TASK_SEND_WEBHOOK
from infra.queueing import task_id_for
from infra.settings import Settings, get_settings
from infra.store import job_to_schema

log = logging.getLogger(__name__)


def secret_bytes(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_"))
    return secret.encode("utf-8")


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_bytes(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def schedule(app, job_id: str) -> None:
    from worker.runner import worker_store

    row = worker_store().get_job(job_id)
    if row is None or not row.webhook_url:
        return
    settings = get_settings()
    try:
        app.send_task(
            TASK_SEND_WEBHOOK,
            args=[job_id],
            queue=settings.webhook_queue,
            task_id=task_id_for(job_id),
        )
    except Exception as exc:
        log.warning("could not queue the webhook for %s: %s", job_id, exc)


def _allowed(url: str, settings: Settings) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    return host in {h.lower() for h in settings.webhook_allowed_hosts}


def deliver(job_id: str) -> bool:
    """One delivery attempt; True when the receiver answered 2xx (or there is nothing to do)."""
    from worker.runner import worker_store

    settings = get_settings()
    store = worker_store()
    row = store.get_job(job_id)
    if row is None or not row.webhook_url or row.webhook_delivered_at is not None:
        return True
    if not _allowed(row.webhook_url, settings):
        # The allow-list may have shrunk since submit; never post to a host it no longer names.
        log.warning("webhook host of %s is no longer allowed; not sending", job_id)
        return True
    body = job_to_schema(row, settings.public_base_url).model_dump_json().encode()
    msg_id = f"msg_{job_id}_{row.status}"
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "user-agent": "linearize-webhooks",
    }
    if settings.webhook_secret:
        headers["webhook-signature"] = sign(settings.webhook_secret, msg_id, timestamp, body)
    ok = False
    try:
        response = httpx.post(
            row.webhook_url,
            content=body,
            headers=headers,
            timeout=settings.webhook_timeout_s,
            follow_redirects=False,
        )
        ok = 200 <= response.status_code < 300
        if not ok:
            log.info("webhook for %s answered %s", job_id, response.status_code)
    except httpx.HTTPError as exc:
        log.info("webhook for %s failed: %s", job_id, exc)
    store.record_webhook_attempt(job_id, ok)
    store.add_event(
        job_id, "log", f"webhook {'delivered' if ok else 'failed'}", data={"webhook_id": msg_id}
    )
    return ok
