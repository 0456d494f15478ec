"""A worker SIGKILLed during healing: the retried attempt, on another host that shares only
Redis, PostgreSQL and the bucket, resumes from the healing checkpoint the first one published
(linearize.resume), and ends with the checkpoint of an uninterrupted run, sooner than one."""

from __future__ import annotations

import pytest
import torch
from s3_helpers import bucket_keys
from safetensors.torch import load_file
from stack_helpers import drop_pg_schema, pg_schema_url, tiny_spec, wait_until
from test_s3 import PREFIX, _bucket_stack, _host, _own_cache

HEAL_STEPS = 200
EVERY = 20  # steps between healing checkpoints
KILL_AFTER = 170  # steps the first attempt heals before it is killed


@pytest.fixture
def job_db(pg_database):
    url, schema = pg_schema_url(pg_database)
    yield url
    drop_pg_schema(pg_database, schema)


def _events(client, job_id: str) -> list:
    """Every event of the job, page by page."""
    events, cursor = [], None
    while True:
        page = client.events(job_id, after=cursor, limit=1000)
        events += page.items
        if not page.items or page.next_cursor is None:
            return events
        cursor = page.next_cursor


def _healing_step(client, job_id: str) -> int:
    steps = [e.current for e in _events(client, job_id) if e.stage == "heal"]
    return max(steps, default=0)


def _attempt_seconds(client, job_id: str, attempt: int) -> float:
    """From the attempt's `running` event to the job's terminal one."""
    events = [e for e in _events(client, job_id) if e.type == "status"]
    running = [e.ts for e in events if e.status == "running"]
    return (events[-1].ts - running[attempt - 1]).total_seconds()


def _weights(directory) -> dict:
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.slow  # three jobs in fresh pool processes: ~2.5-4 min on 2 loaded cores
def test_worker_killed_during_healing_resumes_from_its_checkpoint_on_another_host(
    tmp_path,
    s3_server,
    job_db,
    shared_redis,
    model_root,
    text_file,
):
    bucket = s3_server.new_bucket()
    stack = _bucket_stack(
        tmp_path / "stack",
        s3_server,
        bucket,
        job_db,
        shared_redis,
        model_root,
        LINEARIZE_HEAL_CHECKPOINT_STEPS=EVERY,
    )
    spec = {
        "heal_steps": HEAL_STEPS,
        "heal_seconds": 600,
        "generation_prompts": 0,
        "calib_tokens": 1024,
        "eval_tokens": 512,
    }
    try:
        stack.start_api()
        first = stack.start_worker(env=_own_cache(_host(stack, "host-a")))
        with stack.client() as client:
            dataset = client.upload_dataset(text_file).id
            job = client.submit(tiny_spec(dataset, **spec))
            wait_until(
                lambda: _healing_step(client, job.id) >= KILL_AFTER,
                120,
                interval=0.05,
                what="healing to pass the kill step",
            )
        stack.kill_worker(first)  # the whole host: its scratch and cache are gone with it
        stack.start_worker(env=_own_cache(_host(stack, "host-b")))
        resumed = stack.wait_terminal(job.id)
        assert resumed.status == "succeeded" and resumed.attempts == 2, (
            resumed.error,
            stack.tail(),
        )
        with stack.client() as client:
            fresh = client.submit(tiny_spec(dataset, **spec))  # another job id: another slot
            done = stack.wait_terminal(fresh.id)
            assert done.status == "succeeded", (done.error, stack.tail())
            report = client.report(job.id)
            notes = [e.message for e in _events(client, job.id)]
            fresh_report = client.report(fresh.id)
            resumed_s = _attempt_seconds(client, job.id, attempt=2)
            fresh_s = _attempt_seconds(client, fresh.id, attempt=1)
            client.download_checkpoint(job.id, tmp_path / "resumed")
            client.download_checkpoint(fresh.id, tmp_path / "fresh")

        step = report["resumed"]["healing_step"]
        assert step % EVERY == 0 and KILL_AFTER - EVERY <= step <= HEAL_STEPS, report["resumed"]
        assert f"healing from step {step}" in report["resumed"]["stages"]
        assert any(f"healing resumed from the checkpoint at step {step}" in n for n in notes)
        assert fresh_report["resumed"] is None
        assert report["selection"]["healing"]["steps"] == HEAL_STEPS
        expected, got = _weights(tmp_path / "fresh"), _weights(tmp_path / "resumed")
        assert expected.keys() == got.keys()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
        assert resumed_s < fresh_s, (resumed_s, fresh_s)
        # Both jobs are over: their state is gone from the bucket too.
        assert bucket_keys(s3_server, bucket, f"{PREFIX}/cache/resume/") == []
    finally:
        stack.stop()
