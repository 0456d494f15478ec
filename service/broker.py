"""The API side of the broker: publishing, inspecting the queue, and the reconciler.

The database decides what should run; the reconciler re-sends every queued job the broker has lost (Redis restarted without
persistence, a publish that failed while Redis was down, a message fetched by a worker that died).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import timedelta

from celery import Celery

from api_schemas.jobs import TASK_RUN_JOB, TASK_SEND_WEBHOOK
from infra.db import utcnow
from infra.objectstore import ArtifactStore, artifact_store
from infra.queueing import celery_config, job_id_of, task_id_for
from infra.settings import Settings
from infra.store import Store

log = logging.getLogger(__name__)

# kombu's Redis transport keeps priority levels as extra lists named queue + sep + level.
_REDIS_PRIORITY_SEP = "\x06\x16"
_REDIS_PRIORITY_LEVELS = (3, 6, 9)
_REDIS_UNACKED_KEY = "unacked"


class Broker:
    """Publishes job and webhook tasks; inspects the broker for the reconciler and /readyz."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.app = Celery("linearize-api", set_as_current=False)
        self.app.conf.update(celery_config(settings))
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._redis = None
        self._sqla = None

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
        if self._sqla is not None:
            self._sqla.dispose()

    def warm_up(self) -> None:
        """Do the publisher's one-time set-up before the first request: Celery's task
        machinery, a pooled connection and the queues' declarations. Left to the first submit,
        it added ~0.1 s to that request (~0.02 s after it, measured on a quiet host). One
        connection only: the pool grows with concurrent publishes, and connections opened ahead
        would all go stale together when Redis restarts. A broker that is down now is left to
        the submits and the reconciler, as when it goes down later."""
        try:
            self.app.loader.import_default_modules()
            with self.app.producer_or_acquire() as producer:
                producer.connection.ensure_connection(max_retries=1)
                for queue in (self.settings.job_queue, self.settings.webhook_queue):
                    producer.maybe_declare(self.app.amqp.queues[queue])
        except Exception as exc:
            log.warning("broker not reachable at start (%s); publishing will retry", exc)

    def publish_job(self, job_id: str) -> bool:
        """Send the job to its queue; False if the broker is down (the reconciler retries)."""
        return self._publish(TASK_RUN_JOB, job_id, self.settings.job_queue)

    def publish_webhook(self, job_id: str) -> bool:
        return self._publish(TASK_SEND_WEBHOOK, job_id, self.settings.webhook_queue)

    def _publish(self, name: str, job_id: str, queue: str) -> bool:
        if time.monotonic() < self._down_until:
            return False
        try:
            self.app.send_task(
                name,
                args=[job_id],
                queue=queue,
                task_id=task_id_for(job_id),
                retry=True,
                # One quick retry covers a pooled connection that died with a Redis restart;
                # more would hold the HTTP request while the broker is really down.
                retry_policy={
                    "max_retries": 1,
                    "interval_start": 0,
                    "interval_step": 0.2,
                    "interval_max": 0.2,
                },
            )
            return True
        except Exception as exc:  # any transport error: the DB row stays queued
            log.warning("publish of %s for %s failed: %s", name, job_id, exc)
            with self._lock:
                self._down_until = time.monotonic() + self.settings.broker_retry_after_s
            return False

    # Inspection -------------------------------------------------------------------------

    def _redis_client(self):
        if self._redis is None:
            import redis

            self._redis = redis.Redis.from_url(
                self.settings.resolved_broker_url, socket_timeout=2, socket_connect_timeout=1
            )
        return self._redis

    def _sqla_engine(self):
        if self._sqla is None:
            from sqlalchemy import create_engine

            url = self.settings.resolved_broker_url.removeprefix("sqla+")
            self._sqla = create_engine(url, connect_args={"timeout": 5})
        return self._sqla

    def ping(self) -> bool:
        try:
            if self.settings.broker_is_redis:
                return bool(self._redis_client().ping())
            from sqlalchemy import text

            with self._sqla_engine().connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:
            return False

    def queue_depth(self) -> int | None:
        try:
            if self.settings.broker_is_redis:
                r = self._redis_client()
                return sum(int(r.llen(key)) for key in self._redis_queue_keys())
            from sqlalchemy import text

            with self._sqla_engine().connect() as conn:
                return int(
                    conn.execute(
                        text(
                            "SELECT count(*) FROM kombu_message m JOIN kombu_queue q "
                            "ON m.queue_id = q.id WHERE q.name = :q AND m.visible"
                        ),
                        {"q": self.settings.job_queue},
                    ).scalar_one()
                )
        except Exception:
            return None

    def _redis_queue_keys(self) -> list[str]:
        queue = self.settings.job_queue
        return [queue] + [f"{queue}{_REDIS_PRIORITY_SEP}{p}" for p in _REDIS_PRIORITY_LEVELS]

    def job_ids_held(self) -> set[str] | None:
        """Job ids with a message waiting or in flight; None when the broker cannot tell."""
        try:
            if self.settings.broker_is_redis:
                return self._redis_job_ids()
            return self._sqla_job_ids()
        except Exception as exc:
            log.info("cannot inspect the broker: %s", exc)
            return None

    def _redis_job_ids(self) -> set[str]:
        r = self._redis_client()
        held: set[str] = set()
        for key in self._redis_queue_keys():
            for raw in r.lrange(key, 0, -1):
                held.add(job_id_of(json.loads(raw)["headers"]["id"]))
        for raw in r.hvals(_REDIS_UNACKED_KEY):
            message = json.loads(raw)[0]
            held.add(job_id_of(message["headers"]["id"]))
        return held

    def _sqla_job_ids(self) -> set[str]:
        from sqlalchemy import text

        held: set[str] = set()
        with self._sqla_engine().connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT m.payload FROM kombu_message m JOIN kombu_queue q "
                    "ON m.queue_id = q.id WHERE q.name = :q AND m.visible"
                ),
                {"q": self.settings.job_queue},
            )
            for (payload,) in rows:
                held.add(job_id_of(json.loads(payload)["headers"]["id"]))
        return held


class Reconciler:
    """Makes the broker match the database, and applies retention. Safe to run in every API
    process at once: publishing a job twice is harmless (the worker's lease drops the copy)."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        broker: Broker,
        artifacts: ArtifactStore | None = None,
    ):
        self.settings = settings
        self.store = store
        self.broker = broker
        self.artifacts = artifacts if artifacts is not None else artifact_store(settings)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_retention: float | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="reconciler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            try:
                self.run_once()
            except Exception:
                log.exception("reconcile pass failed")
            if self._stop.wait(self.settings.reconcile_interval_s):
                return

    def run_once(self) -> dict[str, int]:
        # Jobs it cancels get their webhook through the outbox, written with the status.
        requeued = self.store.requeue_expired_leases()
        cutoff = utcnow() - timedelta(seconds=self.settings.requeue_grace_s)
        never_sent, overdue = self.store.queued_to_reconcile(cutoff)
        # Reading the broker's queue costs a decode per message: only when a job sent before
        # the grace period may have been lost (a broker restart without persistence).
        held = self.broker.job_ids_held() if overdue else None
        lost = [job_id for job_id in overdue if held is not None and job_id not in held]
        published = 0
        for job_id in [*never_sent, *lost]:
            if self.broker.publish_job(job_id):
                self.store.mark_enqueued(job_id)
                published += 1
        if self._last_retention is None or time.monotonic() - self._last_retention > 3600:
            self._last_retention = time.monotonic()
            self.apply_retention()
        if requeued or published:
            log.info(
                "reconciled: %d leases expired, %d jobs (re)published", len(requeued), published
            )
        return {"expired_leases": len(requeued), "published": published}

    def apply_retention(self) -> None:
        now = utcnow()
        for job_id in self.store.expire_artifacts(
            now - timedelta(days=self.settings.artifact_retention_days)
        ):
            self._quietly(self.artifacts.delete_job, job_id)
        for path in self.store.expire_datasets(
            now - timedelta(days=self.settings.dataset_retention_days)
        ):
            self._quietly(self.artifacts.delete_dataset, path)
        # Workers that died mid-upload long ago (their job was retried elsewhere or failed).
        self._quietly(
            self.artifacts.abort_stale_uploads, self.settings.s3_stale_upload_hours * 3600
        )

    @staticmethod
    def _quietly(action, *args) -> None:
        try:
            action(*args)
        except Exception as exc:  # retention runs again in an hour
            log.warning("retention step %s%r failed: %s", action.__name__, args, exc)
