"""Crashes on real processes: a SIGKILLed pool process, a lost worker, a Redis restart.

Each test runs its own API and worker with the production worker settings (a fresh pool
process per task, acks late, requeue on worker loss) and short leases and timeouts.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from stack_helpers import Stack, lease_pid, stack_env, tiny_spec, wait_until

HEAVY = {"calib_tokens": 32768, "eval_tokens": 32768, "seq_len": 64}


@pytest.fixture
def sqlite_stack(tmp_path, model_root, shared_redis):
    stack = Stack(
        tmp_path / "stack",
        stack_env(
            tmp_path / "stack",
            broker_url=shared_redis,
            database_url=f"sqlite:///{tmp_path / 'jobs.sqlite'}",
            model_root=model_root,
            # Short (the heavy job takes ~25 s on a slow 2-core host), still ordered soft < hard <
            # visibility: an unacked message of the killed worker comes back within the test,
            # and must then be dropped.
            LINEARIZE_TASK_SOFT_TIME_LIMIT_S=45,
            LINEARIZE_TASK_TIME_LIMIT_S=50,
            LINEARIZE_VISIBILITY_TIMEOUT_S=55,
        ),
    )
    stack.start_api()
    yield stack
    stack.stop()


class ArtifactWatcher:
    """Polls the API and the artifact directory for as long as the job runs, recording every
    state it sees, so the test can prove no partial checkpoint was ever visible."""

    def __init__(self, stack: Stack, job_id: str):
        self.stack, self.job_id = stack, job_id
        self.directory = Path(stack.env["LINEARIZE_DATA_DIR"]) / "artifacts" / "jobs" / job_id
        self.disk_views: list[frozenset[tuple[str, int]]] = []
        self.api_views: list[list[tuple[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        with self.stack.http() as http:
            while not self._stop.is_set():
                final = self.directory / "checkpoint"
                if final.is_dir():
                    self.disk_views.append(
                        frozenset(
                            (p.relative_to(final).as_posix(), p.stat().st_size)
                            for p in final.rglob("*")
                            if p.is_file()
                        )
                    )
                try:
                    response = http.get(f"/v1/jobs/{self.job_id}/artifacts")
                    if response.status_code == 200:
                        self.api_views.append(
                            [(a["path"], a["size"]) for a in response.json()["items"]]
                        )
                    else:
                        assert response.status_code == 409, response.text
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def assert_never_partial(self, manifest: list[tuple[str, int]]) -> None:
        complete = frozenset(manifest)
        assert all(view == complete for view in self.disk_views), "a partial checkpoint was visible"
        assert all(sorted(view) == sorted(manifest) for view in self.api_views)
        leftovers = [p.name for p in self.directory.iterdir() if p.name != "checkpoint"]
        assert leftovers == [], f"staging directories left behind: {leftovers}"


def _wait_progress(stack: Stack, job_id: str):
    with stack.client() as client:

        def past_loading():
            events = client.events(job_id, limit=1000).items
            moving = any(e.type == "progress" and e.stage not in ("load", "data") for e in events)
            return events if moving else None

        return wait_until(past_loading, 120, what=f"{job_id} to make progress")


def _manifest(stack: Stack, job_id: str) -> list[tuple[str, int]]:
    with stack.client() as client:
        return [(a.path, a.size) for a in client.artifacts(job_id).items]


def test_pool_process_sigkilled_mid_job_is_retried_and_never_exposes_partial_artifacts(
    sqlite_stack, text_file
):
    stack = sqlite_stack
    stack.start_worker()
    with stack.client() as client:
        dataset = client.upload_dataset(text_file).id
        job = client.submit(tiny_spec(dataset, **HEAVY))
    watcher = ArtifactWatcher(stack, job.id)
    events = _wait_progress(stack, job.id)
    pid = lease_pid(events)
    assert pid is not None and pid != stack.workers[0].pid  # a pool child, not the main process
    os.kill(pid, signal.SIGKILL)

    done = stack.wait_terminal(job.id)
    watcher.stop()
    assert done.status == "succeeded", (done.error, stack.tail())
    assert done.attempts == 2
    with stack.client() as client:
        statuses = [e.status for e in client.events(job.id, limit=1000).items if e.type == "status"]
    assert statuses.count("running") == 2 and statuses[-1] == "succeeded"
    watcher.assert_never_partial(_manifest(stack, job.id))


def test_whole_worker_killed_mid_job_is_recovered_by_another_worker(sqlite_stack, text_file):
    stack = sqlite_stack
    first = stack.start_worker()
    with stack.client() as client:
        dataset = client.upload_dataset(text_file).id
        job = client.submit(tiny_spec(dataset, **HEAVY))
        follower = client.submit(tiny_spec(dataset))
    watcher = ArtifactWatcher(stack, job.id)
    _wait_progress(stack, job.id)
    # Main process and pool at once: the message stays unacked in Redis until the (short, test)
    # visibility timeout. Recovery does not wait for it: the lease expires, the reconciler
    # requeues the job, and the late redelivery finds it finished and is dropped.
    stack.kill_worker(first)

    with stack.http() as http:  # no heartbeat any more: not ready
        wait_until(
            lambda: http.get("/readyz").json()["checks"]["workers"] == 0,
            15,
            what="readyz to notice the lost worker",
        )
    stack.start_worker()
    done = stack.wait_terminal(job.id)
    watcher.stop()
    assert done.status == "succeeded", (done.error, stack.tail())
    assert done.attempts == 2
    assert stack.wait_terminal(follower.id).status == "succeeded"
    watcher.assert_never_partial(_manifest(stack, job.id))


def test_redis_killed_and_restarted_mid_flight_loses_nothing(
    tmp_path, model_root, private_redis, text_file
):
    root = tmp_path / "stack"
    stack = Stack(
        root,
        stack_env(
            root,
            broker_url=private_redis.url,
            database_url=f"sqlite:///{tmp_path / 'jobs.sqlite'}",
            model_root=model_root,
            # Not a process-crash test: a warm pool process keeps the six jobs short.
            LINEARIZE_WORKER_MAX_TASKS_PER_CHILD=0,
        ),
    )
    try:
        stack.start_api()
        stack.start_worker()
        with stack.client() as client:
            dataset = client.upload_dataset(text_file).id
            jobs = [client.submit(tiny_spec(dataset, **HEAVY)).id]
            jobs += [client.submit(tiny_spec(dataset)).id for _ in range(2)]
            _wait_progress(stack, jobs[0])

            private_redis.kill()  # no persistence: every queued message is gone
            with stack.http() as http:
                for _ in range(3):
                    start = time.monotonic()
                    response = http.post("/v1/jobs", json=tiny_spec(dataset))
                    assert response.status_code == 202, response.text
                    assert time.monotonic() - start < 5
                    jobs.append(response.json()["id"])
                ready = http.get("/readyz")
                assert ready.status_code == 503 and ready.json()["checks"]["broker"] is False
            time.sleep(1)
            private_redis.start()  # same port, empty

            finals = [stack.wait_terminal(job_id, timeout=240) for job_id in jobs]
        assert [j.status for j in finals] == ["succeeded"] * 6, (
            [(j.id, j.status, j.error) for j in finals],
            stack.tail(),
        )
        with stack.http() as http:
            wait_until(lambda: http.get("/readyz").status_code == 200, 30, what="readyz")
    finally:
        stack.stop()
