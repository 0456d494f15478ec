"""The Celery app: `celery -A worker.app worker -Q <queue> -c 1` (one process per GPU).

Configuration comes from the same LINEARIZE_ settings as the API (infra.queueing.celery_config):
acks late, requeue when the pool process dies, prefetch 1, soft and hard time limits, Redis
visibility timeout above the hard limit, and a fresh process per task.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading

from celery import Celery, signals

from infra.queueing import celery_config
from infra.settings import get_settings

log = logging.getLogger(__name__)

app = Celery("linearize", include=["worker.tasks"])
app.conf.update(celery_config(get_settings()))


class _Heartbeat:
    """Writes this worker's liveness to the job store, which /readyz reads."""

    def __init__(self, name: str, queues: str):
        self.name, self.queues = name, queues
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def _loop(self) -> None:
        from infra.capacity import measure_capacity
        from worker.runner import worker_store

        settings = get_settings()
        while True:
            try:
                capacity = measure_capacity(settings.resolved_scratch_dir)
                worker_store().heartbeat_worker(
                    self.name, self.queues, socket.gethostname(), os.getpid(), capacity
                )
            except Exception as exc:
                log.warning("heartbeat failed: %s", exc)
            if self.stop.wait(settings.worker_heartbeat_s):
                break
        with contextlib.suppress(Exception):
            worker_store().remove_worker(self.name)


_heartbeat: _Heartbeat | None = None


@signals.worker_init.connect
def _check_artifact_store(**_kwargs) -> None:
    """Refuse to start on a store it cannot use (wrong credentials, no bucket): a clear line in
    the worker log beats every job failing later."""
    from infra.objectstore import ArtifactStoreError, artifact_store

    try:
        artifact_store(get_settings()).check()
    except ArtifactStoreError as exc:
        log.critical("artifact store not usable, worker not started: %s", exc)
        raise SystemExit(2) from None


@signals.worker_init.connect
def _check_schema(**_kwargs) -> None:
    """Refuse to start on a job store of another schema revision, naming the upgrade command."""
    from infra.db import init_schema, make_engine
    from infra.migrate import SchemaMismatch

    engine = make_engine(get_settings().resolved_database_url)
    try:
        init_schema(engine)
    except SchemaMismatch as exc:
        log.critical("worker not started: %s", exc)
        raise SystemExit(2) from None
    finally:
        engine.dispose()


@signals.worker_ready.connect
def _start_heartbeat(sender=None, **_kwargs) -> None:
    global _heartbeat
    queues = ",".join(sorted(q.name for q in sender.task_consumer.queues)) if sender else ""
    _heartbeat = _Heartbeat(getattr(sender, "hostname", socket.gethostname()), queues)
    _heartbeat.thread.start()


@signals.worker_shutdown.connect
def _stop_heartbeat(**_kwargs) -> None:
    if _heartbeat is not None:
        _heartbeat.stop.set()
        _heartbeat.thread.join(timeout=5)


@signals.worker_process_init.connect
def _after_fork(**_kwargs) -> None:
    # Connections inherited from the parent must not be shared with it across the fork.
    from worker.runner import reset_after_fork

    reset_after_fork()
