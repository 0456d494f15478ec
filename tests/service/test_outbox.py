"""The webhook outbox: written with the job's final state, delivered with retries, and delivered
while the broker is down when the job finishes (real Redis, API and worker processes)."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from stack_helpers import Stack, free_port, stack_env, tiny_spec, wait_until
from test_reliability import _wait_progress

from api_schemas import CompressSpec, DataSpec
from infra.db import OutboxRow, init_schema, make_engine, utcnow
from infra.settings import Settings
from infra.store import Store
from infra.webhooks import dispatch_due

# Long enough (seconds) that the broker can be killed while it runs.
MEDIUM = {"calib_tokens": 8192, "eval_tokens": 8192, "seq_len": 64}


class _Receiver(BaseHTTPRequestHandler):
    calls: list[dict] = []
    answers: list[int] = []

    def do_POST(self):  # noqa: N802 (http.server naming)
        body = self.rfile.read(int(self.headers["content-length"]))
        type(self).calls.append({"body": json.loads(body), "id": self.headers["webhook-id"]})
        status = type(self).answers.pop(0) if type(self).answers else 204
        self.send_response(status)
        self.end_headers()

    def log_message(self, *_args):
        pass


@pytest.fixture
def receiver():
    _Receiver.calls, _Receiver.answers = [], []
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()


@pytest.fixture
def store(database_url):
    engine = make_engine(database_url)
    init_schema(engine)
    yield Store(engine)
    engine.dispose()


def _finished_job(store: Store, url: str | None, status: str = "succeeded") -> str:
    spec = CompressSpec(
        model="tiny-llama", layers=2, data=DataSpec(dataset_id="ds_x"), webhook_url=url
    )
    row, _ = store.create_job("alpha", spec, idempotency_key=None, max_queued=10)
    store.claim(row.id, "w1", lease_ttl_s=30, max_attempts=3, max_running=5,
                owner_is_dead=lambda _o: False)  # fmt: skip
    assert store.finish(row.id, "w1", status, message="done")
    return row.id


def _outbox(store: Store, job_id: str) -> list[OutboxRow]:
    with store.session() as s:
        return list(s.query(OutboxRow).filter(OutboxRow.job_id == job_id).all())


def test_finish_writes_the_webhook_to_the_outbox_with_the_status(store):
    hooked = _finished_job(store, "http://hooks.example.com/x", "failed")
    plain = _finished_job(store, None)
    [entry] = _outbox(store, hooked)
    assert (entry.job_status, entry.url, entry.attempts) == (
        "failed",
        "http://hooks.example.com/x",
        0,
    )
    assert entry.delivered_at is None and entry.next_attempt_at <= utcnow()
    assert _outbox(store, plain) == []


def test_cancel_of_a_queued_job_writes_its_webhook(store):
    spec = CompressSpec(model="tiny-llama", layers=2, data=DataSpec(dataset_id="ds_x"),
                        webhook_url="http://hooks.example.com/x")  # fmt: skip
    row, _ = store.create_job("alpha", spec, idempotency_key=None, max_queued=10)
    store.request_cancel(row.id)
    assert [e.job_status for e in _outbox(store, row.id)] == ["cancelled"]


def test_dispatch_retries_after_the_delays_then_gives_up(store, receiver, tmp_path):
    settings = Settings(data_dir=tmp_path, webhook_allowed_hosts="127.0.0.1",
                        webhook_retry_delays_s="0,0")  # fmt: skip
    delivered_job = _finished_job(store, receiver)
    _Receiver.answers = [500]
    assert dispatch_due(store, settings) == 0  # first attempt: 500, due again at once
    assert dispatch_due(store, settings) == 1
    assert dispatch_due(store, settings) == 0  # nothing left
    [entry] = _outbox(store, delivered_job)
    assert (entry.attempts, entry.last_error, entry.given_up_at) == (2, None, None)
    assert entry.delivered_at is not None
    assert store.get_job(delivered_job).webhook_attempts == 2
    assert [c["id"] for c in _Receiver.calls] == [f"msg_{delivered_job}_succeeded"] * 2

    _Receiver.calls, _Receiver.answers = [], [503, 503, 503, 503]
    lost_job = _finished_job(store, receiver)
    for _ in range(4):
        dispatch_due(store, settings)
    [entry] = _outbox(store, lost_job)
    assert (entry.attempts, entry.last_error) == (3, "HTTP 503")  # one try + two retries
    assert entry.given_up_at is not None and len(_Receiver.calls) == 3


def test_an_attempt_taken_by_one_dispatcher_is_not_posted_by_another(store):
    job_id = _finished_job(store, "http://hooks.example.com/x")
    [entry] = _outbox(store, job_id)
    later = utcnow() + timedelta(seconds=60)
    assert store.take_webhook(entry, later)
    assert not store.take_webhook(entry, later)  # same attempt count: already taken
    assert store.due_webhooks(utcnow()) == []


def test_webhook_is_delivered_when_the_broker_is_down_at_finish(
    tmp_path, model_root, private_redis, text_file, receiver
):
    root = tmp_path / "stack"
    stack = Stack(
        root,
        stack_env(root, broker_url=private_redis.url, model_root=model_root,
                  database_url=f"sqlite:///{tmp_path / 'jobs.sqlite'}"),
    )  # fmt: skip
    try:
        stack.start_api()
        stack.start_worker()
        with stack.client() as client:
            dataset = client.upload_dataset(text_file).id
            job = client.submit(tiny_spec(dataset, webhook_url=receiver, **MEDIUM))
            _wait_progress(stack, job.id)
            private_redis.kill()  # the broker is gone before the job finishes
            final = stack.wait_terminal(job.id, timeout=240)
            assert final.status == "succeeded", stack.tail()
            wait_until(lambda: _Receiver.calls, 30, what="the webhook")
            assert private_redis.proc.poll() is not None  # still down when it was delivered
        [call] = _Receiver.calls
        assert call["body"]["id"] == job.id and call["body"]["status"] == "succeeded"
        assert call["id"] == f"msg_{job.id}_succeeded"
    finally:
        stack.stop()
