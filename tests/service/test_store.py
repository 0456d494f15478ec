"""The job store on SQLite and PostgreSQL: idempotency, limits, leases, cancel, events, schema."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import update

from api_schemas import CompressSpec, DataSpec
from api_schemas.jobs import Artifact
from infra.db import JobRow, init_schema, make_engine, utcnow
from infra.store import Claim, IdempotencyConflict, Store, TenantLimitExceeded


@pytest.fixture
def store(database_url):
    engine = make_engine(database_url)
    init_schema(engine)
    yield Store(engine)
    engine.dispose()


def spec(layers: int = 2, **extra) -> CompressSpec:
    return CompressSpec(
        model="tiny-llama", layers=layers, data=DataSpec(dataset_id="ds_x"), **extra
    )


def claim(store: Store, job_id: str, owner: str, *, dead=lambda _o: False, max_attempts=3):
    return store.claim(
        job_id,
        owner,
        lease_ttl_s=30,
        max_attempts=max_attempts,
        max_running=10,
        owner_is_dead=dead,
    )


def test_create_job_same_key_same_body_returns_the_same_job(store):
    first, created = store.create_job("alpha", spec(), idempotency_key="k1", max_queued=10)
    again, created_again = store.create_job("alpha", spec(), idempotency_key="k1", max_queued=10)
    assert created and not created_again
    assert again.id == first.id


def test_create_job_same_key_other_body_conflicts(store):
    store.create_job("alpha", spec(), idempotency_key="k1", max_queued=10)
    with pytest.raises(IdempotencyConflict):
        store.create_job("alpha", spec(layers=3), idempotency_key="k1", max_queued=10)


def test_create_job_keys_are_per_tenant(store):
    a, _ = store.create_job("alpha", spec(), idempotency_key="k", max_queued=10)
    b, created = store.create_job("beta", spec(layers=3), idempotency_key="k", max_queued=10)
    assert created and a.id != b.id


def test_create_job_over_the_tenant_limit_is_refused(store):
    for _ in range(2):
        store.create_job("alpha", spec(), idempotency_key=None, max_queued=2)
    with pytest.raises(TenantLimitExceeded):
        store.create_job("alpha", spec(), idempotency_key=None, max_queued=2)
    store.create_job("beta", spec(), idempotency_key=None, max_queued=2)  # others unaffected


def test_get_job_of_another_tenant_is_none(store):
    row, _ = store.create_job("alpha", spec(), idempotency_key=None, max_queued=10)
    assert store.get_job(row.id, "alpha") is not None
    assert store.get_job(row.id, "beta") is None


def test_claim_gives_the_lease_to_exactly_one_of_concurrent_workers(store):
    row, _ = store.create_job("alpha", spec(), idempotency_key=None, max_queued=10)
    results: list[Claim] = []
    barrier = threading.Barrier(6)

    def take(i: int) -> None:
        barrier.wait()
        results.append(claim(store, row.id, f"host:{1000 + i}:t").claim)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(Claim.ACQUIRED) == 1
    assert results.count(Claim.BUSY) == 5
    assert store.get_job(row.id).attempts == 1


def test_claim_takes_over_a_dead_owner_and_counts_the_attempt(store):
    row, _ = store.create_job("alpha", spec(), idempotency_key=None, max_queued=10)
    assert claim(store, row.id, "h:1:a").claim is Claim.ACQUIRED
    assert claim(store, row.id, "h:2:b").claim is Claim.BUSY
    result = claim(store, row.id, "h:2:b", dead=lambda owner: owner == "h:1:a")
    assert result.claim is Claim.ACQUIRED and result.attempt == 2
    assert not store.renew_lease(row.id, "h:1:a", 30)  # the old owner lost it
    assert not store.finish(row.id, "h:1:a", "succeeded")  # and cannot write the outcome


def test_claim_after_max_attempts_fails_the_job_as_lost(store):
    row, _ = store.create_job("alpha", spec(), idempotency_key=None, max_queued=10)
    dead = lambda _owner: True  # noqa: E731
    for n in range(1, 3):
        assert claim(store, row.id, f"h:{n}:x", dead=dead, max_attempts=2).attempt == n
    assert claim(store, row.id, "h:9:x", dead=dead, max_attempts=2).claim is Claim.FINISHED
    job = store.get_job(row.id)
    assert job.status == "failed" and job.error_code == "worker_lost"
    assert claim(store, row.id, "h:10:x", dead=dead).claim is Claim.TERMINAL


def test_expired_lease_is_requeued_by_the_reconciler_query(store):
    row, _ = store.create_job("alpha", spec(), idempotency_key=None, max_queued=10)
    claim(store, row.id, "h:1:a")
    with store.session() as s:
        s.execute(
            update(JobRow)
            .where(JobRow.id == row.id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
        s.commit()
    assert store.requeue_expired_leases() == [row.id]
    job = store.get_job(row.id)
    assert job.status == "queued" and job.lease_owner is None and job.enqueued_at is None
    assert claim(store, row.id, "h:2:b").attempt == 2


def test_the_reconciler_reads_only_unsent_and_overdue_queued_jobs(store):
    def queued(enqueued_at):
        row, _ = store.create_job("alpha", spec(), idempotency_key=None, max_queued=10)
        with store.session() as s:
            s.execute(update(JobRow).where(JobRow.id == row.id).values(enqueued_at=enqueued_at))
            s.commit()
        return row.id

    now = utcnow()
    unsent, overdue = queued(None), queued(now - timedelta(seconds=60))
    queued(now - timedelta(seconds=5))  # sent within the grace period: in flight, not read
    running = queued(now - timedelta(seconds=60))
    claim(store, running, "h:1:a")
    assert store.queued_to_reconcile(now - timedelta(seconds=30)) == ([unsent], [overdue])


def test_cancel_queued_is_immediate_and_running_is_cooperative(store):
    queued, _ = store.create_job("alpha", spec(), idempotency_key=None, max_queued=10)
    store.request_cancel(queued.id)
    store.request_cancel(queued.id)  # idempotent
    assert store.get_job(queued.id).status == "cancelled"
    assert claim(store, queued.id, "h:1:a").claim is Claim.TERMINAL

    running, _ = store.create_job("alpha", spec(), idempotency_key=None, max_queued=10)
    claim(store, running.id, "h:1:a")
    store.request_cancel(running.id)
    assert store.get_job(running.id).status == "cancelling"
    owner_ok, cancel = store.record_progress(running.id, "h:1:a", "fit", 1, 3, "")
    assert owner_ok and cancel
    assert store.finish(running.id, "h:1:a", "cancelled")
    assert store.get_job(running.id).status == "cancelled"


def test_finish_records_artifacts_report_and_duration(store):
    row, _ = store.create_job("alpha", spec(), idempotency_key=None, max_queued=10)
    claim(store, row.id, "h:1:a")
    artifact = Artifact(path="config.json", size=2, sha256="0" * 64)
    assert store.finish(row.id, "h:1:a", "succeeded", report_json="{}", artifacts=[artifact])
    job = store.get_job(row.id)
    assert job.status == "succeeded" and job.duration_s is not None and job.duration_s >= 0
    assert store.status_counts()["succeeded"] == 1
    buckets, _total, count = store.duration_histogram([1e9])
    assert count == 1 and buckets == [1]


def test_events_are_listed_in_order_after_a_cursor(store):
    row, _ = store.create_job("alpha", spec(), idempotency_key=None, max_queued=10)
    for i in range(5):
        store.add_event(row.id, "log", f"m{i}")
    events = store.list_events(row.id, after=None, limit=100)
    assert [e.status for e in events[:1]] == ["queued"]
    after = store.list_events(row.id, after=events[2].id, limit=100)
    assert [e.message for e in after] == ["m2", "m3", "m4"]


def test_list_jobs_pages_newest_first_with_a_status_filter(store):
    ids = [
        store.create_job("alpha", spec(), idempotency_key=None, max_queued=50)[0].id
        for _ in range(5)
    ]
    store.request_cancel(ids[0])
    page1 = store.list_jobs("alpha", status=None, after=None, limit=2)
    page2 = store.list_jobs("alpha", status=None, after=page1[-1].id, limit=2)
    assert [r.id for r in page1 + page2] == ids[::-1][:4]
    assert [r.id for r in store.list_jobs("alpha", status="cancelled", after=None, limit=9)] == [
        ids[0]
    ]


def test_concurrent_writers_do_not_fail(store):
    """The API's threads and several workers write at once (SQLite: WAL + busy timeout)."""
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            for _ in range(15):
                row, _ = store.create_job(f"t{i}", spec(), idempotency_key=None, max_queued=100)
                store.add_event(row.id, "log", "x")
                store.request_cancel(row.id)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.status_counts() == {"cancelled": 8 * 15}
