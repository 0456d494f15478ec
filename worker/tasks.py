"""Thin tasks: a job id crosses the queue, everything else comes from the store."""

from __future__ import annotations

import logging

from api_schemas.jobs import TASK_RUN_JOB, TASK_SEND_WEBHOOK
from infra.settings import get_settings
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
    if outcome in runner.WEBHOOK_OUTCOMES:
        webhooks.schedule(app, job_id)
    return outcome


@app.task(name=TASK_SEND_WEBHOOK, bind=True, max_retries=None, acks_late=True)
def send_webhook(self, job_id: str) -> str:
    delays = get_settings().webhook_retry_delays_s
    if webhooks.deliver(job_id):
        return "delivered"
    attempt = self.request.retries
    if attempt < len(delays):
        raise self.retry(countdown=delays[attempt])
    log.warning("webhook for %s given up after %d attempts", job_id, attempt + 1)
    return "given_up"
