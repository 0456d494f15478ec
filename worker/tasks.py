"""Thin tasks: a job id crosses the queue, everything else comes from the store."""

from __future__ import annotations

import logging

from api_schemas.jobs import TASK_RUN_JOB, TASK_SEND_WEBHOOK
from worker import runner, webhooks
from worker.app import app

log = logging.getLogger(__name__)

DEFER_COUNTDOWN_S = 5


@app.task(name=TASK_RUN_JOB, bind=True, max_retries=None)
def run_job(self, job_id: str) -> str:
    outcome = runner.run_job(job_id)
    if outcome == runner.DEFER:
        # The tenant is at its running limit: the job stays queued; look again shortly.
        raise self.retry(countdown=DEFER_COUNTDOWN_S)
    # A terminal outcome's webhook is in the outbox already (written with the status).
    return outcome


@app.task(name=TASK_SEND_WEBHOOK, acks_late=True)
def send_webhook(job_id: str) -> str:
    """Messages queued by releases before the outbox: one attempt; retries are the outbox's."""
    return "delivered" if webhooks.deliver(job_id) else "left to the outbox"
