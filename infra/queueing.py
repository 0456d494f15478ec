"""Celery configuration shared by the API (publisher) and the workers, and task id naming.

The API publishes tasks by name (no import of `worker`); both sides build their Celery app from
the same LINEARIZE_ settings, so queues, routes and delivery guarantees cannot drift apart.
"""

from __future__ import annotations

import secrets
from typing import Any

from kombu import Exchange, Queue

from api_schemas.jobs import TASK_RUN_JOB, TASK_SEND_WEBHOOK
from infra.settings import Settings


def celery_config(settings: Settings) -> dict[str, Any]:
    url = settings.resolved_broker_url
    transport: dict[str, Any] = {}
    if settings.broker_is_redis:
        transport = {
            # Above the hard time limit: otherwise Redis hands a still-running task to a second
            # worker (the "redelivery trap").
            "visibility_timeout": settings.visibility_timeout_s,
            "socket_connect_timeout": 2,
            "socket_timeout": 10,
        }
    # (kombu's SQLAlchemy transport hands its options to create_engine: none needed there.)
    return dict(
        broker_url=url,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=2,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_time_limit=settings.task_time_limit_s,
        worker_max_tasks_per_child=settings.worker_max_tasks_per_child or None,
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=settings.job_queue,
        # Each queue with its own direct exchange and key: Celery would otherwise bind every
        # declared queue to the default exchange and key, and webhooks would land on the GPUs.
        task_queues=tuple(
            Queue(name, Exchange(name, type="direct"), routing_key=name)
            for name in (settings.job_queue, settings.webhook_queue)
        ),
        task_routes={
            TASK_RUN_JOB: {"queue": settings.job_queue},
            TASK_SEND_WEBHOOK: {"queue": settings.webhook_queue},
        },
        worker_enable_remote_control=settings.broker_is_redis,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
    )


def task_id_for(job_id: str) -> str:
    """The job id leads the task id, so the reconciler can tell which jobs the broker holds."""
    return f"{job_id}.{secrets.token_hex(4)}"


def job_id_of(task_id: str) -> str:
    return task_id.split(".", 1)[0]
