"""One job run: claim the lease, run the real pipeline, publish artifacts, write the outcome.

Idempotent per job id. A redelivered message finds the job terminal (dropped), leased by a live
worker (dropped: a duplicate), or leased by a dead one (taken over, attempt + 1). The pipeline
writes into a private staging directory (next to the artifact directory, or in this worker's
local scratch when artifacts live in a bucket); the finished checkpoint is published by the
artifact store in one last step, and the database row that points at it is written only by the
lease holder. With a bucket, the engine's cache is shared through it (a miss on one host is a hit
on the next), and scratch is kept under LINEARIZE_SCRATCH_MAX_SIZE after each job (infra.scratch).
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
from infra.artifacts import build_manifest
from infra.db import init_schema, make_engine
from infra.modelcheck import ModelRejected, resolve_model
from infra.objectstore import ArtifactStoreError, artifact_store
from infra.scratch import evict
from infra.settings import Settings, get_settings
from infra.store import SPEC_ADAPTER, Claim, Store

log = logging.getLogger(__name__)

DEFER = "defer"
DROPPED = "dropped"
LEASE_LOST = "lease_lost"
WEBHOOK_OUTCOMES = frozenset({"succeeded", "failed", "cancelled"})

_store: Store | None = None
_store_pid: int | None = None
_artifacts = None
_artifacts_pid: int | None = None


def worker_store() -> Store:
    """One engine per process; rebuilt after a fork (connections never cross processes)."""
    global _store, _store_pid
    if _store is None or _store_pid != os.getpid():
        engine = make_engine(get_settings().resolved_database_url)
        init_schema(engine)
        _store, _store_pid = Store(engine), os.getpid()
    return _store


def worker_artifacts():
    """The artifact store of this process (boto3 clients are not shared across a fork)."""
    global _artifacts, _artifacts_pid
    if _artifacts is None or _artifacts_pid != os.getpid():
        _artifacts, _artifacts_pid = artifact_store(get_settings()), os.getpid()
    return _artifacts


def reset_after_fork() -> None:
    global _store, _store_pid, _artifacts, _artifacts_pid
    if _store is not None:
        _store.engine.dispose(close=False)  # leave the parent's sockets alone
    _store, _store_pid = None, None
    _artifacts, _artifacts_pid = None, None


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
    """The stored spec with server-side names made concrete: dataset id -> a local file (fetched
    into scratch from a bucket), model -> a local path (a bucket model is downloaded)."""
    spec = SPEC_ADAPTER.validate_json(row.spec_json)
    scratch = settings.resolved_scratch_dir
    update: dict[str, object] = {}
    if spec.data.dataset_id is not None:
        dataset = store.get_dataset(row.tenant, spec.data.dataset_id)
        if dataset is None:
            raise ModelRejected(f"dataset {spec.data.dataset_id} no longer exists (retention)")
        path = _held(lambda: worker_artifacts().fetch_dataset(dataset.path, scratch), settings)
        update["data"] = DataSpec(path=str(path), text_field=spec.data.text_field)
    if spec.kind == "compare":
        update["models"] = [_local_model(m, settings) for m in spec.models]
    else:
        update["model"] = _local_model(spec.model, settings)
    return spec.model_copy(update=update)


def _local_model(name: str, settings: Settings) -> str:
    source = resolve_model(name, settings)
    if source.kind != "s3":
        return source.engine_name
    from infra.modelcheck import fetch_s3_model

    models = settings.resolved_scratch_dir / "models"
    return str(_held(lambda: fetch_s3_model(source, settings, models), settings))


def _held(fetch, settings: Settings) -> Path:
    """What `fetch` puts in scratch, held until the job ends so that no eviction removes it (it
    is fetched again if an eviction took it between the two steps)."""
    from linearize import cache

    for _ in range(3):
        path = fetch()
        if not path.is_relative_to(settings.resolved_scratch_dir) or cache.hold(path):
            return path
    raise ArtifactStoreError(f"{path} was evicted from scratch as soon as it was fetched")


def _engine_cache_dir(settings: Settings) -> str:
    """Baselines and converted models: on the shared volume when there is one, else scratch."""
    if settings.artifact_url:
        return str(settings.resolved_scratch_dir / "cache")
    return str(settings.resolved_artifact_dir / "cache")


def _use_engine_cache(settings: Settings) -> None:
    """The engine's cache goes on the shared artifact volume, or in local scratch and shared
    through the bucket, rather than in the worker's home (unless LINEARIZE_CACHE_DIR is set)."""
    os.environ.setdefault("LINEARIZE_CACHE_DIR", _engine_cache_dir(settings))
    # Imported here, in the forked child: the parent never loads torch or touches CUDA.
    from linearize import cache

    cache.set_remote(worker_artifacts().shared_cache())


def _release_scratch(settings: Settings) -> None:
    """The job's holds end; then scratch goes back under its limit. Never fails the job."""
    from linearize import cache

    cache.release_held()
    if settings.scratch_max_size is None:
        return
    try:
        evict(settings.resolved_scratch_dir, settings.scratch_max_size)
    except OSError as exc:
        log.warning("scratch eviction in %s failed: %s", settings.resolved_scratch_dir, exc)


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
    token = f"{claim.attempt}-{secrets.token_hex(4)}"
    with _Lease(store, job_id, owner, settings.lease_ttl_s) as lease:
        staging: Path | None = None
        try:
            artifacts = worker_artifacts()
            artifacts.clean_attempts(job_id)  # leftovers of attempts whose process died
            staging = artifacts.staging_dir(job_id, token)
            staging.mkdir(parents=True)
        except (ArtifactStoreError, OSError) as exc:
            return _fail(store, job_id, owner, ("artifact_store", str(exc), 3))
        try:
            return _execute(store, settings, row, owner, lease, staging / "checkpoint", token)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            _release_scratch(settings)


def _publisher(store: Store, job_id: str, owner: str, lease: _Lease):
    """Progress events for the upload, and the lease check just before it becomes visible."""

    def progress(current: int, total: int, name: str) -> None:
        owner_ok, _cancel = store.record_progress(
            job_id, owner, "publish", current, total, f"uploading {name}"
        )
        if not owner_ok or lease.lost.is_set():
            raise LeaseLost(job_id)

    def commit_ok() -> None:
        if lease.lost.is_set() or not store.renew_lease(job_id, owner, lease.ttl_s):
            raise LeaseLost(job_id)

    return progress, commit_ok


def _execute(
    store: Store, settings: Settings, row, owner: str, lease: _Lease, out: Path, token: str
) -> str:
    job_id = row.id
    try:
        _use_engine_cache(settings)
        spec = _prepare_spec(row, settings, store)
        from linearize import pipeline

        report = pipeline.run(
            spec,
            output_dir=out,
            report_path=None,
            progress=_ProgressSink(store, job_id, owner, lease, settings.progress_interval_s),
            force=False,
            resume_slot=job_id,  # a retried attempt takes over what this one kept
        )
        out.mkdir(parents=True, exist_ok=True)
        report_json = report.model_dump_json(indent=2)
        if not (out / "report.json").exists():
            (out / "report.json").write_text(report_json, encoding="utf-8")
        manifest = build_manifest(out)
        if lease.lost.is_set():
            raise LeaseLost(job_id)
        progress, commit_ok = _publisher(store, job_id, owner, lease)
        worker_artifacts().publish(job_id, token, out, manifest, commit_ok, progress)
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
    except ArtifactStoreError as exc:
        # Nothing was made visible: the manifest (or the rename) is the last step.
        log.error("job %s: artifact store error: %s", job_id, exc)
        return _fail(store, job_id, owner, ("artifact_store", str(exc), 3))
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
