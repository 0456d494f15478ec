"""Job store operations: the database is the source of truth, the broker only transport.

Every state change is a conditional UPDATE (compare-and-set on status / lease owner), so the API,
the reconciler and several workers can act on one job at once without a lost update.
"""

from __future__ import annotations

import enum
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, TypeAdapter
from sqlalchemy import delete, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from api_schemas.jobs import (
    ACTIVE_STATUSES,
    TERMINAL_STATUSES,
    Artifact,
    Dataset,
    Job,
    JobError,
    JobEvent,
    JobProgress,
    JobUrls,
)
from api_schemas.specs import JobSpec
from infra.db import DatasetRow, EventRow, JobRow, OutboxRow, WorkerRow, utcnow

SPEC_ADAPTER: TypeAdapter[Any] = TypeAdapter(JobSpec)


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request body."""


class TenantLimitExceeded(Exception):
    """The tenant already has the maximum number of queued jobs."""


class Claim(enum.Enum):
    ACQUIRED = "acquired"  # this worker owns the job now
    TERMINAL = "terminal"  # already finished elsewhere: drop
    FINISHED = "finished"  # this claim finished it (cancel requested, or attempts used up)
    BUSY = "busy"  # a live lease elsewhere: a duplicate delivery, drop
    DEFER = "defer"  # the tenant is at its running limit: try again later
    MISSING = "missing"


@dataclass(frozen=True)
class ClaimResult:
    claim: Claim
    attempt: int = 0


_id_lock = threading.Lock()
_last_id_us = 0


def new_id(prefix: str) -> str:
    """Time-ordered ids (microseconds + randomness): listing by id is listing by creation.
    Strictly increasing within a process, so two jobs created in one microsecond still sort."""
    global _last_id_us
    with _id_lock:
        _last_id_us = max(time.time_ns() // 1000, _last_id_us + 1)
        stamp = _last_id_us
    return f"{prefix}_{stamp:014x}{secrets.token_hex(5)}"


def canonical_spec_json(spec: BaseModel) -> str:
    """Defaults included and keys sorted: two bodies that mean the same spec hash the same."""
    return json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def _aware(ts: datetime | None) -> datetime | None:
    return ts.replace(tzinfo=UTC) if ts is not None else None


def _same(column, value):
    return column.is_(None) if value is None else column == value


def job_urls(job_id: str, base: str = "") -> JobUrls:
    root = f"{base.rstrip('/')}/v1/jobs/{job_id}"
    return JobUrls(
        self=root,
        events=f"{root}/events",
        cancel=f"{root}/cancel",
        report=f"{root}/report",
        artifacts=f"{root}/artifacts",
        checkpoint=f"{root}/checkpoint.tar",
    )


def job_to_schema(row: JobRow, base_url: str = "") -> Job:
    total = row.progress_total or 0
    current = row.progress_current or 0
    error = None
    if row.error_code:
        error = JobError(
            code=row.error_code,
            message=row.error_message or "",
            exit_code=row.error_exit_code if row.error_exit_code is not None else 3,
        )
    return Job(
        id=row.id,
        kind=row.kind,
        status=row.status,  # type: ignore[arg-type]
        created_at=_aware(row.created_at),  # type: ignore[arg-type]
        started_at=_aware(row.started_at),
        finished_at=_aware(row.finished_at),
        progress=JobProgress(
            stage=row.progress_stage,
            current=current,
            total=total,
            percent=round(100.0 * current / total, 2) if total else 0.0,
        ),
        attempts=row.attempts or 0,
        error=error,
        spec=SPEC_ADAPTER.validate_json(row.spec_json),
        metadata=json.loads(row.labels_json or "{}"),
        urls=job_urls(row.id, base_url),
    )


def event_to_schema(row: EventRow) -> JobEvent:
    return JobEvent(
        id=row.id,
        job_id=row.job_id,
        ts=_aware(row.ts),  # type: ignore[arg-type]
        type=row.type,  # type: ignore[arg-type]
        status=row.status,  # type: ignore[arg-type]
        stage=row.stage,
        current=row.current or 0,
        total=row.total or 0,
        message=row.message or "",
        data=json.loads(row.data_json) if row.data_json else None,
    )


def dataset_to_schema(row: DatasetRow) -> Dataset:
    return Dataset(
        id=row.id,
        bytes=row.bytes,
        sha256=row.sha256,
        filename=row.filename,
        created_at=_aware(row.created_at),
    )


def _add_webhook(s: Session, job_id: str, status: str, now: datetime) -> None:
    """The job's webhook, in the transaction that writes its final state: it cannot be lost
    between the two, whatever the broker does (the outbox dispatcher delivers it)."""
    url = s.scalar(select(JobRow.webhook_url).where(JobRow.id == job_id))
    if url:
        s.add(OutboxRow(job_id=job_id, job_status=status, url=url, created_at=now,
                        next_attempt_at=now, attempts=0))  # fmt: skip


class Store:
    def __init__(self, engine: Engine):
        self.engine = engine
        factory = sessionmaker(engine, expire_on_commit=False)
        self.session: Callable[[], AbstractContextManager[Session]] = factory
        if engine.dialect.name == "sqlite":
            # SQLite has one writer at a time, and a writer that finds the lock taken sleeps in
            # growing steps (busy_timeout): threads of one process queue on a Python lock
            # instead, which removed the p99 spikes of concurrent submits.
            lock = threading.RLock()

            @contextmanager
            def serialized() -> Iterator[Session]:
                with lock, factory() as session:
                    yield session

            self.session = serialized

    # Datasets ------------------------------------------------------------------------------

    def add_dataset(self, row: DatasetRow) -> DatasetRow:
        with self.session() as s:
            s.add(row)
            s.commit()
        return row

    def get_dataset(self, tenant: str, dataset_id: str) -> DatasetRow | None:
        with self.session() as s:
            row = s.get(DatasetRow, dataset_id)
            return row if row is not None and row.tenant == tenant else None

    def expire_datasets(self, before: datetime) -> list[str]:
        """Forget datasets older than `before`; returns their file paths for deletion."""
        with self.session() as s:
            rows = s.scalars(select(DatasetRow).where(DatasetRow.created_at < before)).all()
            paths = [r.path for r in rows]
            if rows:
                s.execute(delete(DatasetRow).where(DatasetRow.id.in_([r.id for r in rows])))
                s.commit()
            return paths

    # Jobs: the API side ----------------------------------------------------------------------

    def create_job(
        self,
        tenant: str,
        spec: BaseModel,
        *,
        idempotency_key: str | None,
        max_queued: int,
    ) -> tuple[JobRow, bool]:
        """Store a queued job; returns (job, created). Same key + same spec returns the old job."""
        spec_json = canonical_spec_json(spec)
        digest = hashlib.sha256(spec_json.encode()).hexdigest()
        with self.session() as s:
            if idempotency_key is not None:
                existing = self._by_key(s, tenant, idempotency_key)
                if existing is not None:
                    return self._replay(existing, digest), False
            queued = s.scalar(
                select(func.count())
                .select_from(JobRow)
                .where(JobRow.tenant == tenant, JobRow.status == "queued")
            )
            if (queued or 0) >= max_queued:
                raise TenantLimitExceeded(f"tenant has {queued} queued jobs (limit {max_queued})")
            now = utcnow()
            row = JobRow(
                id=new_id("job"),
                tenant=tenant,
                kind=getattr(spec, "kind", "compress"),
                status="queued",
                spec_json=spec_json,
                labels_json=json.dumps(getattr(spec, "metadata", {}) or {}),
                idempotency_key=idempotency_key,
                request_sha256=digest,
                webhook_url=getattr(spec, "webhook_url", None),
                created_at=now,
                # Optimistic: the caller publishes right after the commit and clears this if
                # the broker refuses, which saves a second write on every successful submit.
                enqueued_at=now,
                attempts=0,
                cancel_requested=False,
                progress_current=0,
                progress_total=0,
                artifacts_expired=False,
                webhook_attempts=0,
            )
            s.add(row)
            s.flush()
            s.add(EventRow(job_id=row.id, ts=now, type="status", status="queued", message=""))
            try:
                s.commit()
            except IntegrityError:
                # Two requests with one key raced; the loser answers with the winner's job.
                s.rollback()
                existing = self._by_key(s, tenant, idempotency_key) if idempotency_key else None
                if existing is None:
                    raise
                return self._replay(existing, digest), False
            return row, True

    @staticmethod
    def _by_key(s: Session, tenant: str, key: str) -> JobRow | None:
        return s.scalar(
            select(JobRow).where(JobRow.tenant == tenant, JobRow.idempotency_key == key)
        )

    @staticmethod
    def _replay(existing: JobRow, digest: str) -> JobRow:
        if existing.request_sha256 != digest:
            raise IdempotencyConflict(
                "this Idempotency-Key was already used with a different request body"
            )
        return existing

    def clear_enqueued(self, job_id: str) -> None:
        """The publish failed: let the reconciler send this job as soon as the broker is back."""
        with self.session() as s:
            s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status == "queued")
                .values(enqueued_at=None)
            )
            s.commit()

    def mark_enqueued(self, job_id: str) -> None:
        with self.session() as s:
            s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status == "queued")
                .values(enqueued_at=utcnow())
            )
            s.commit()

    def get_job(self, job_id: str, tenant: str | None = None) -> JobRow | None:
        with self.session() as s:
            row = s.get(JobRow, job_id)
            if row is None or (tenant is not None and row.tenant != tenant):
                return None
            return row

    def list_jobs(
        self, tenant: str, *, status: str | None, after: str | None, limit: int
    ) -> list[JobRow]:
        """Newest first; `after` is the last id of the previous page."""
        query = select(JobRow).where(JobRow.tenant == tenant)
        if status:
            query = query.where(JobRow.status == status)
        if after:
            query = query.where(JobRow.id < after)
        with self.session() as s:
            return list(s.scalars(query.order_by(JobRow.id.desc()).limit(limit)).all())

    def request_cancel(self, job_id: str) -> None:
        """queued -> cancelled now; running -> cancelling (the worker stops at its next check)."""
        now = utcnow()
        with self.session() as s:
            done = s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status == "queued")
                .values(status="cancelled", cancel_requested=True, finished_at=now)
            ).rowcount
            if done:
                s.add(
                    EventRow(
                        job_id=job_id,
                        ts=now,
                        type="status",
                        status="cancelled",
                        message="cancelled before start",
                    )
                )
                _add_webhook(s, job_id, "cancelled", now)
            else:
                done = s.execute(
                    update(JobRow)
                    .where(JobRow.id == job_id, JobRow.status == "running")
                    .values(status="cancelling", cancel_requested=True)
                ).rowcount
                if done:
                    s.add(
                        EventRow(
                            job_id=job_id,
                            ts=now,
                            type="status",
                            status="cancelling",
                            message="cancel requested",
                        )
                    )
            s.commit()

    def list_events(self, job_id: str, *, after: int | None, limit: int) -> list[EventRow]:
        query = select(EventRow).where(EventRow.job_id == job_id)
        if after is not None:
            query = query.where(EventRow.id > after)
        with self.session() as s:
            return list(s.scalars(query.order_by(EventRow.id).limit(limit)).all())

    def add_event(self, job_id: str, type_: str, message: str = "", **fields: Any) -> None:
        data = fields.pop("data", None)
        with self.session() as s:
            s.add(
                EventRow(
                    job_id=job_id,
                    ts=utcnow(),
                    type=type_,
                    message=message,
                    data_json=json.dumps(data) if data is not None else None,
                    **fields,
                )
            )
            s.commit()

    # Jobs: the worker side -------------------------------------------------------------------

    def claim(
        self,
        job_id: str,
        owner: str,
        *,
        lease_ttl_s: float,
        max_attempts: int,
        max_running: int,
        owner_is_dead: Callable[[str], bool],
    ) -> ClaimResult:
        """Take the job's lease, or say why not. Compare-and-set, so two deliveries of one
        message (Redis redelivery, reconciler re-send) never both run it."""
        for _ in range(10):
            with self.session() as s:
                row = s.get(JobRow, job_id)
                if row is None:
                    return ClaimResult(Claim.MISSING)
                if row.status in TERMINAL_STATUSES:
                    return ClaimResult(Claim.TERMINAL)
                now = utcnow()
                lease_live = (
                    row.lease_owner is not None
                    and row.lease_expires_at is not None
                    and row.lease_expires_at > now
                    and not owner_is_dead(row.lease_owner)
                )
                if row.status in ("running", "cancelling") and lease_live:
                    return ClaimResult(Claim.BUSY)
                guard = (
                    JobRow.id == job_id,
                    JobRow.status == row.status,
                    JobRow.attempts == row.attempts,
                    _same(JobRow.lease_owner, row.lease_owner),
                )
                if row.status == "cancelling" or row.cancel_requested:
                    if self._finish_where(s, guard, row, "cancelled", message="cancelled"):
                        return ClaimResult(Claim.FINISHED)
                    continue
                if row.attempts >= max_attempts:
                    msg = (
                        f"gave up after {row.attempts} attempts: the worker running this job "
                        "was lost each time"
                    )
                    error = ("worker_lost", msg, 3)
                    if self._finish_where(s, guard, row, "failed", error=error, message=msg):
                        return ClaimResult(Claim.FINISHED)
                    continue
                running = s.scalar(
                    select(func.count())
                    .select_from(JobRow)
                    .where(
                        JobRow.tenant == row.tenant,
                        JobRow.status.in_(("running", "cancelling")),
                        JobRow.id != job_id,
                    )
                )
                if (running or 0) >= max_running:
                    return ClaimResult(Claim.DEFER)
                attempt = row.attempts + 1
                done = s.execute(
                    update(JobRow)
                    .where(*guard)
                    .values(
                        status="running",
                        lease_owner=owner,
                        lease_expires_at=now + timedelta(seconds=lease_ttl_s),
                        attempts=attempt,
                        started_at=row.started_at or now,
                    )
                ).rowcount
                if not done:
                    s.rollback()
                    continue
                s.add(
                    EventRow(
                        job_id=job_id,
                        ts=now,
                        type="status",
                        status="running",
                        message=f"attempt {attempt} on {owner}",
                    )
                )
                s.commit()
                return ClaimResult(Claim.ACQUIRED, attempt)
        return ClaimResult(Claim.BUSY)

    def _finish_where(
        self,
        s: Session,
        guard: Iterable[Any],
        row: JobRow,
        status: str,
        *,
        error: tuple[str, str, int] | None = None,
        message: str = "",
    ) -> bool:
        now = utcnow()
        values: dict[str, Any] = dict(
            status=status, finished_at=now, lease_owner=None, lease_expires_at=None
        )
        if error:
            values.update(error_code=error[0], error_message=error[1], error_exit_code=error[2])
        done = s.execute(update(JobRow).where(*guard).values(**values)).rowcount
        if not done:
            s.rollback()
            return False
        s.add(EventRow(job_id=row.id, ts=now, type="status", status=status, message=message))
        _add_webhook(s, row.id, status, now)
        s.commit()
        return True

    def renew_lease(self, job_id: str, owner: str, lease_ttl_s: float) -> bool:
        with self.session() as s:
            done = s.execute(
                update(JobRow)
                .where(
                    JobRow.id == job_id,
                    JobRow.lease_owner == owner,
                    JobRow.status.in_(("running", "cancelling")),
                )
                .values(lease_expires_at=utcnow() + timedelta(seconds=lease_ttl_s))
            ).rowcount
            s.commit()
            return bool(done)

    def record_progress(
        self, job_id: str, owner: str, stage: str, current: int, total: int, message: str
    ) -> tuple[bool, bool]:
        """Store progress and an event; returns (still the owner, cancel requested)."""
        with self.session() as s:
            done = s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.lease_owner == owner)
                .values(progress_stage=stage, progress_current=current, progress_total=total)
            ).rowcount
            if done:
                s.add(
                    EventRow(
                        job_id=job_id,
                        ts=utcnow(),
                        type="progress",
                        stage=stage,
                        current=current,
                        total=total,
                        message=message,
                    )
                )
            cancel = s.scalar(select(JobRow.cancel_requested).where(JobRow.id == job_id))
            s.commit()
            return bool(done), bool(cancel)

    def cancel_requested(self, job_id: str) -> bool:
        with self.session() as s:
            return bool(s.scalar(select(JobRow.cancel_requested).where(JobRow.id == job_id)))

    def finish(
        self,
        job_id: str,
        owner: str,
        status: str,
        *,
        error: tuple[str, str, int] | None = None,
        report_json: str | None = None,
        artifacts: list[Artifact] | None = None,
        message: str = "",
    ) -> bool:
        """Write the terminal state if this worker still holds the lease."""
        now = utcnow()
        with self.session() as s:
            row = s.get(JobRow, job_id)
            if row is None or row.lease_owner != owner:
                return False
            values: dict[str, Any] = dict(
                status=status,
                finished_at=now,
                duration_s=(now - row.started_at).total_seconds() if row.started_at else None,
                lease_owner=None,
                lease_expires_at=None,
            )
            if error:
                values.update(error_code=error[0], error_message=error[1], error_exit_code=error[2])
            if report_json is not None:
                values["report_json"] = report_json
            if artifacts is not None:
                values["artifacts_json"] = json.dumps([a.model_dump() for a in artifacts])
            done = s.execute(
                update(JobRow)
                .where(
                    JobRow.id == job_id,
                    JobRow.lease_owner == owner,
                    JobRow.status.in_(("running", "cancelling")),
                )
                .values(**values)
            ).rowcount
            if not done:
                s.rollback()
                return False
            s.add(EventRow(job_id=job_id, ts=now, type="status", status=status, message=message))
            _add_webhook(s, job_id, status, now)
            s.commit()
            return True

    def record_webhook_attempt(self, job_id: str, delivered: bool) -> None:
        with self.session() as s:
            values: dict[str, Any] = {"webhook_attempts": JobRow.webhook_attempts + 1}
            if delivered:
                values["webhook_delivered_at"] = utcnow()
            s.execute(update(JobRow).where(JobRow.id == job_id).values(**values))
            s.commit()

    # Webhook outbox --------------------------------------------------------------------------

    def due_webhooks(self, now: datetime, limit: int = 50) -> list[OutboxRow]:
        with self.session() as s:
            return list(
                s.scalars(
                    select(OutboxRow)
                    .where(
                        OutboxRow.delivered_at.is_(None),
                        OutboxRow.given_up_at.is_(None),
                        OutboxRow.next_attempt_at <= now,
                    )
                    .order_by(OutboxRow.next_attempt_at)
                    .limit(limit)
                ).all()
            )

    def take_webhook(self, entry: OutboxRow, hold_until: datetime) -> bool:
        """Compare-and-set on the attempt count: one dispatcher of many posts a given attempt."""
        with self.session() as s:
            done = s.execute(
                update(OutboxRow)
                .where(
                    OutboxRow.id == entry.id,
                    OutboxRow.attempts == entry.attempts,
                    OutboxRow.delivered_at.is_(None),
                    OutboxRow.given_up_at.is_(None),
                )
                .values(attempts=entry.attempts + 1, next_attempt_at=hold_until)
            ).rowcount
            s.commit()
            return bool(done)

    def record_webhook_outcome(
        self, entry: OutboxRow, *, delivered: bool, error: str | None, retry_at: datetime | None
    ) -> None:
        """Delivered, or due again at `retry_at`, or given up when there is no retry left."""
        now = utcnow()
        values: dict[str, Any] = {"last_error": error}
        if delivered:
            values["delivered_at"] = now
        elif retry_at is None:
            values["given_up_at"] = now
        else:
            values["next_attempt_at"] = retry_at
        with self.session() as s:
            s.execute(update(OutboxRow).where(OutboxRow.id == entry.id).values(**values))
            s.commit()
        self.record_webhook_attempt(entry.job_id, delivered)

    def pending_webhooks(self, job_id: str) -> list[OutboxRow]:
        with self.session() as s:
            return list(
                s.scalars(
                    select(OutboxRow).where(
                        OutboxRow.job_id == job_id,
                        OutboxRow.delivered_at.is_(None),
                        OutboxRow.given_up_at.is_(None),
                    )
                ).all()
            )

    # Reconciler ----------------------------------------------------------------------------

    def queued_to_reconcile(
        self, sent_before: datetime, *, limit: int = 1000
    ) -> tuple[list[str], list[str]]:
        """Ids of the queued jobs the reconciler looks at: (never sent to the broker, sent
        before `sent_before`). Jobs sent since are in flight and are not read at all: the pass
        runs in every API process, beside its requests, so it reads two columns, not rows."""
        with self.session() as s:
            rows = s.execute(
                select(JobRow.id, JobRow.enqueued_at)
                .where(
                    JobRow.status == "queued",
                    (JobRow.enqueued_at.is_(None)) | (JobRow.enqueued_at < sent_before),
                )
                .order_by(JobRow.id)
                .limit(limit)
            ).all()
        never_sent = [job_id for job_id, sent in rows if sent is None]
        return never_sent, [job_id for job_id, sent in rows if sent is not None]

    def requeue_expired_leases(
        self, now: datetime | None = None, finished: list[str] | None = None
    ) -> list[str]:
        """Running jobs whose worker stopped renewing: back to queued, or cancelled if a cancel
        was pending (those ids are appended to `finished`, for their webhooks)."""
        now = now or utcnow()
        requeued: list[str] = []
        with self.session() as s:
            rows = s.scalars(
                select(JobRow).where(
                    JobRow.status.in_(("running", "cancelling")),
                    JobRow.lease_expires_at < now,
                )
            ).all()
        for row in rows:
            with self.session() as s:
                guard = (
                    JobRow.id == row.id,
                    JobRow.status == row.status,
                    _same(JobRow.lease_owner, row.lease_owner),
                    _same(JobRow.lease_expires_at, row.lease_expires_at),
                )
                if row.status == "cancelling":
                    done = self._finish_where(s, guard, row, "cancelled", message="cancelled")
                    if done and finished is not None:
                        finished.append(row.id)
                    continue
                done = s.execute(
                    update(JobRow)
                    .where(*guard)
                    .values(
                        status="queued", lease_owner=None, lease_expires_at=None, enqueued_at=None
                    )
                ).rowcount
                if done:
                    s.add(
                        EventRow(
                            job_id=row.id,
                            ts=now,
                            type="status",
                            status="queued",
                            message=f"lease of {row.lease_owner} expired; requeued",
                        )
                    )
                    requeued.append(row.id)
                s.commit()
        return requeued

    def expire_artifacts(self, before: datetime) -> list[str]:
        with self.session() as s:
            ids = s.scalars(
                select(JobRow.id).where(
                    JobRow.finished_at < before,
                    JobRow.artifacts_expired.is_(False),
                    JobRow.status.in_(tuple(TERMINAL_STATUSES)),
                )
            ).all()
            if ids:
                s.execute(
                    update(JobRow)
                    .where(JobRow.id.in_(ids))
                    .values(artifacts_expired=True, artifacts_json=None)
                )
                s.commit()
            return list(ids)

    # Workers and metrics ---------------------------------------------------------------------

    def heartbeat_worker(
        self, name: str, queues: str, hostname: str, pid: int, capacity: Any = None
    ) -> None:
        """Liveness, and the capacity (infra.capacity.Capacity) the submit checks read."""
        now = utcnow()
        sizes: dict[str, Any] = {}
        if capacity is not None:
            sizes = dict(
                memory_bytes=capacity.memory_bytes,
                scratch_free_bytes=capacity.scratch_free_bytes,
                device=capacity.device,
                device_memory_bytes=capacity.device_memory_bytes,
            )
        with self.session() as s:
            row = s.get(WorkerRow, name)
            if row is None:
                s.add(
                    WorkerRow(
                        name=name,
                        queues=queues,
                        hostname=hostname,
                        pid=pid,
                        started_at=now,
                        last_seen=now,
                        **sizes,
                    )
                )
            else:
                row.last_seen = now
                row.pid = pid
                row.queues = queues
                for key, value in sizes.items():
                    setattr(row, key, value)
            try:
                s.commit()
            except IntegrityError:
                s.rollback()

    def remove_worker(self, name: str) -> None:
        with self.session() as s:
            s.execute(delete(WorkerRow).where(WorkerRow.name == name))
            s.commit()

    def alive_workers(self, within_s: float) -> list[WorkerRow]:
        since = utcnow() - timedelta(seconds=within_s)
        with self.session() as s:
            return list(s.scalars(select(WorkerRow).where(WorkerRow.last_seen >= since)).all())

    def status_counts(self) -> dict[str, int]:
        with self.session() as s:
            rows = s.execute(select(JobRow.status, func.count()).group_by(JobRow.status)).all()
        return {status: count for status, count in rows}

    def duration_histogram(self, bounds: list[float]) -> tuple[list[int], float, int]:
        """Cumulative bucket counts, sum and count of finished job durations."""
        with self.session() as s:
            count, total = s.execute(
                select(func.count(JobRow.duration_s), func.coalesce(func.sum(JobRow.duration_s), 0))
            ).one()
            buckets = []
            for bound in bounds:
                buckets.append(
                    s.scalar(
                        select(func.count()).select_from(JobRow).where(JobRow.duration_s <= bound)
                    )
                    or 0
                )
        return buckets, float(total or 0), int(count or 0)

    def active_count(self, tenant: str) -> int:
        with self.session() as s:
            return (
                s.scalar(
                    select(func.count())
                    .select_from(JobRow)
                    .where(JobRow.tenant == tenant, JobRow.status.in_(tuple(ACTIVE_STATUSES)))
                )
                or 0
            )
