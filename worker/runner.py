"""One job run: claim the lease, run the real pipeline, publish artifacts, write the outcome.

Idempotent per job id. A redelivered message finds the job terminal (dropped), leased by a live
worker (dropped: a duplicate), or leased by a dead one (taken over, attempt + 1). The pipeline
writes into a private staging directory; the finished checkpoint appears in one rename, and the
database row that points at it is written only by the lease holder.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import threading
import time
import traceback
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded

from api_schemas import DataSpec, ProgressEvent
from infra.artifacts import build_manifest, checkpoint_dir, datasets_dir, job_dir, publish_dir
from infra.db import init_schema, make_engine
from infra.modelcheck import ModelRejected, resolve_model
from infra.settings import Settings, get_settings
from infra.store import SPEC_ADAPTER, Claim, Store

log = logging.getLogger(__name__)

DEFER = "defer"
DROPPED = "dropped"
LEASE_LOST = "lease_lost"
WEBHOOK_OUTCOMES = frozenset({"succeeded", "failed", "cancelled"})

_store: Store | None = None
_store_pid: int | None = None


def worker_store() -> Store:
    """One engine per process; rebuilt after a fork (connections never cross processes)."""
    global _store, _store_pid
    if _store is None or _store_pid != os.getpid():
        engine = make_engine(get_settings().resolved_database_url)
        init_schema(engine)
        _store, _store_pid = Store(engine), os.getpid()
    return _store


def reset_after_fork() -> None:
    global _store, _store_pid
    if _store is not None:
        _store.engine.dispose(close=False)  # leave the parent's sockets alone
    _store, _store_pid = None, None


def new_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def owner_is_dead(owner: str) -> bool:
    """True only when provable: the lease holder ran on this host and its process is gone."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return True  # an earlier run in this very process: it is not running any more
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a SIGKILLed pool child may linger as a zombie until Celery reaps it
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return False


class LeaseLost(Exception):
    """Another worker took the job over (this one was presumed dead); stop without writing."""


class _Lease:
    """Renews the lease from a thread, so long steps without progress events keep it."""

    def __init__(self, store: Store, job_id: str, owner: str, ttl_s: float):
        self.store, self.job_id, self.owner, self.ttl_s = store, job_id, owner, ttl_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lease", daemon=True)

    def __enter__(self) -> _Lease:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self.store.renew_lease(self.job_id, self.owner, self.ttl_s):
                    self.lost.set()
                    return
            except Exception as exc:  # a DB hiccup: try again at the next tick
                log.warning("lease renewal for %s failed: %s", self.job_id, exc)


class _ProgressSink:
    """Stores progress as job events and turns a cancel request into `Cancelled`."""

    def __init__(self, store: Store, job_id: str, owner: str, lease: _Lease, interval_s: float):
        self.store, self.job_id, self.owner, self.lease = store, job_id, owner, lease
        self.interval_s = interval_s
        self._last_write = 0.0
        self._last_stage: str | None = None

    def __call__(self, event: ProgressEvent) -> None:
        from linearize.errors import Cancelled

        if self.lease.lost.is_set():
            raise LeaseLost(self.job_id)
        now = time.monotonic()
        boundary = (
            event.stage != self._last_stage or event.total == 0 or event.current >= event.total
        )
        if boundary or now - self._last_write >= self.interval_s:
            owner_ok, cancel = self.store.record_progress(
                self.job_id, self.owner, event.stage, event.current, event.total, event.message
            )
            self._last_write, self._last_stage = now, event.stage
            if not owner_ok:
                raise LeaseLost(self.job_id)
        else:
            cancel = self.store.cancel_requested(self.job_id)
        if cancel:
            raise Cancelled(f"cancelled during {event.stage}")


def _prepare_spec(row, settings: Settings, store: Store):
    """The stored spec with server-side names made concrete: dataset id -> file, model -> path."""
    spec = SPEC_ADAPTER.validate_json(row.spec_json)
    update: dict[str, object] = {}
    if spec.data.dataset_id is not None:
        dataset = store.get_dataset(row.tenant, spec.data.dataset_id)
        if dataset is None:
            raise ModelRejected(f"dataset {spec.data.dataset_id} no longer exists (retention)")
        path = datasets_dir(settings.resolved_artifact_dir) / dataset.path
        update["data"] = DataSpec(path=str(path), text_field=spec.data.text_field)
    if spec.kind == "compare":
        update["models"] = [resolve_model(m, settings).engine_name for m in spec.models]
    else:
        update["model"] = resolve_model(spec.model, settings).engine_name
    return spec.model_copy(update=update)


def _clean_staging(directory: Path) -> None:
    if directory.is_dir():
        for stale in directory.glob(".attempt-*"):
            shutil.rmtree(stale, ignore_errors=True)


def run_job(job_id: str) -> str:
    settings = get_settings()
    store = worker_store()
    owner = new_owner()
    claim = store.claim(
        job_id,
        owner,
        lease_ttl_s=settings.lease_ttl_s,
        max_attempts=settings.max_attempts,
        max_running=settings.tenant_max_running,
        owner_is_dead=owner_is_dead,
    )
    if claim.claim is Claim.DEFER:
        return DEFER
    if claim.claim is Claim.FINISHED:
        row = store.get_job(job_id)
        return row.status if row is not None else DROPPED
    if claim.claim is not Claim.ACQUIRED:
        log.info("job %s not run here: %s", job_id, claim.claim.value)
        return DROPPED

    row = store.get_job(job_id)
    assert row is not None
    base = job_dir(settings.resolved_artifact_dir, job_id)
    _clean_staging(base)  # leftovers of attempts whose process died
    staging = base / f".attempt-{claim.attempt}-{secrets.token_hex(4)}"
    staging.mkdir(parents=True)
    out = staging / "checkpoint"
    with _Lease(store, job_id, owner, settings.lease_ttl_s) as lease:
        try:
            return _execute(store, settings, row, owner, lease, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _execute(store: Store, settings: Settings, row, owner: str, lease: _Lease, out: Path) -> str:
    job_id = row.id
    try:
        spec = _prepare_spec(row, settings, store)
        # The engine's cache (baseline and analysis per model and data) goes on the shared
        # artifact volume rather than the worker's home directory, unless set explicitly.
        os.environ.setdefault("LINEARIZE_CACHE_DIR", str(settings.resolved_artifact_dir / "cache"))
        # Imported here, in the forked child: the parent never loads torch or touches CUDA.
        from linearize import pipeline

        report = pipeline.run(
            spec,
            output_dir=out,
            report_path=None,
            progress=_ProgressSink(store, job_id, owner, lease, settings.progress_interval_s),
            force=False,
        )
        out.mkdir(parents=True, exist_ok=True)
        report_json = report.model_dump_json(indent=2)
        if not (out / "report.json").exists():
            (out / "report.json").write_text(report_json, encoding="utf-8")
        manifest = build_manifest(out)
        if lease.lost.is_set():
            raise LeaseLost(job_id)
        publish_dir(out, checkpoint_dir(settings.resolved_artifact_dir, job_id))
        gate = report.gate
        message = "" if gate is None else f"gate {'passed' if gate.passed else 'failed'}"
        if store.finish(
            job_id, owner, "succeeded", report_json=report_json, artifacts=manifest, message=message
        ):
            return "succeeded"
        return LEASE_LOST
    except LeaseLost:
        log.warning("job %s: lease lost; another worker owns it now", job_id)
        return LEASE_LOST
    except SoftTimeLimitExceeded:
        error = ("timeout", f"the job exceeded {settings.task_soft_time_limit_s} s", 3)
        return _fail(store, job_id, owner, error)
    except ModelRejected as exc:
        return _fail(store, job_id, owner, ("bad_input", str(exc), 2))
    except Exception as exc:
        from linearize.errors import Cancelled, LinearizeError

        if isinstance(exc, Cancelled):
            done = store.finish(job_id, owner, "cancelled", message=str(exc))
            return "cancelled" if done else LEASE_LOST
        if isinstance(exc, LinearizeError):
            return _fail(store, job_id, owner, (exc.code, str(exc), exc.exit_code))
        log.error("job %s crashed:\n%s", job_id, traceback.format_exc())
        return _fail(store, job_id, owner, ("internal_error", f"{type(exc).__name__}: {exc}", 3))


def _fail(store: Store, job_id: str, owner: str, error: tuple[str, str, int]) -> str:
    done = store.finish(job_id, owner, "failed", error=error, message=error[1])
    return "failed" if done else LEASE_LOST
