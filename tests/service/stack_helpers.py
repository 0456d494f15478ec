"""Helpers for the service tests: service processes (uvicorn, Celery), a private redis-server,
PostgreSQL schemas, and small specs. Timeouts are short (lease, reconcile, heartbeat, visibility)
so recovery paths finish quickly. Loopback only.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]


SHARED_REDIS = os.environ.get("LINEARIZE_TEST_REDIS", "redis://127.0.0.1:6379/13")


PG_SERVER = os.environ.get("LINEARIZE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")


PG_DB = "linearize_test"


WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


WEBHOOK_SECRET = "whsec_" + "dGVzdC1zZWNyZXQtZm9yLXdlYmhvb2tzLTAxMjM0NTY3"  # base64 of ascii


KEYS = {"alpha": "ka", "beta": "kb"}


TINY_LAYERS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def tiny_spec(dataset_id: str, **overrides) -> dict:
    """A compress job on the tiny model that runs in seconds."""
    body = {
        "kind": "compress",
        "model": "tiny-llama",
        "layers": 2,
        "data": {"dataset_id": dataset_id},
        "calib_tokens": 256,
        "eval_tokens": 256,
        "seq_len": 64,
        "format": "standard",
        # Healing (distillation) runs up to 400 steps by default; the service tests are about
        # the service, so only the full-flow test asks for some.
        "heal_steps": 0,
    }
    body.update(overrides)
    return body


def pg_admin_url() -> str:
    return f"{PG_SERVER}/postgres"  # always there, unlike any test database


def pg_schema_url(pg_database: str) -> tuple[str, str]:
    """A fresh schema and a URL whose connections use it as search_path."""
    from sqlalchemy import create_engine, text

    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = create_engine(pg_database, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    engine.dispose()
    return f"{pg_database}?options=-csearch_path%3D{schema}", schema


def drop_pg_schema(pg_database: str, schema: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(pg_database, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
    engine.dispose()


class RedisServer:
    """A private redis-server on a free port, without persistence, that tests may kill."""

    def __init__(self, directory: Path):
        self.port = free_port()
        self.directory = directory
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (.ci/run installs it)")
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        wait_until(lambda: _pings(client), 10, what="redis-server")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


def stack_env(root: Path, *, broker_url: str, database_url: str, model_root: Path, **extra) -> dict:
    queue = f"test-{uuid.uuid4().hex[:8]}"  # a private queue: tests share one Redis
    env = {
        "LINEARIZE_DATA_DIR": str(root / "data"),
        "LINEARIZE_DATABASE_URL": database_url,
        "LINEARIZE_BROKER_URL": broker_url,
        "LINEARIZE_MODEL_ROOTS": str(model_root),
        "LINEARIZE_API_KEYS": ",".join(f"{t}:{k}" for t, k in KEYS.items()),
        "LINEARIZE_JOB_QUEUE": queue,
        "LINEARIZE_WEBHOOK_QUEUE": f"{queue}.webhooks",
        "LINEARIZE_LEASE_TTL_S": "4",
        "LINEARIZE_RECONCILE_INTERVAL_S": "0.5",
        "LINEARIZE_REQUEUE_GRACE_S": "2",
        "LINEARIZE_BROKER_RETRY_AFTER_S": "0.5",
        "LINEARIZE_WORKER_HEARTBEAT_S": "1",
        "LINEARIZE_PROGRESS_INTERVAL_S": "0",
        # Short limits, in order soft < hard < visibility (the redelivery trap, scaled down).
        "LINEARIZE_TASK_SOFT_TIME_LIMIT_S": "150",
        "LINEARIZE_TASK_TIME_LIMIT_S": "160",
        "LINEARIZE_VISIBILITY_TIMEOUT_S": "170",
        "LINEARIZE_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1,localhost",
        "LINEARIZE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "LINEARIZE_WEBHOOK_RETRY_DELAYS_S": "0.3,0.6,1.2",
        "LINEARIZE_WEBHOOK_DISPATCH_INTERVAL_S": "0.2",
        "LINEARIZE_TENANT_MAX_QUEUED": "100",
        "LINEARIZE_TENANT_MAX_RUNNING": "4",
        # One intra-op thread: torch's spinning thread pool on a shared 2-core machine turns a
        # sub-second tiny job into tens of seconds.
        "OMP_NUM_THREADS": "1",
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Stack:
    """An API (uvicorn) and Celery workers as real child processes, like `linearize serve`."""

    def __init__(self, root: Path, env: dict):
        self.root = root
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        root.mkdir(parents=True, exist_ok=True)

    def _spawn(self, args: list[str], log_name: str, env: dict | None = None) -> subprocess.Popen:
        log = self.root / log_name
        self.logs.append(log)
        return subprocess.Popen(
            args,
            cwd=REPO,
            env={**self.env, **(env or {})},
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: killpg takes the pool too
        )

    def start_api(self) -> Stack:
        self.api = self._spawn(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "service.main:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
            ],
            "api.log",
        )
        wait_until(self._healthy, 60, what="the API")
        return self

    def _healthy(self) -> bool:
        if self.api is not None and self.api.poll() is not None:
            raise AssertionError(f"API exited:\n{self.tail()}")
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def start_worker(
        self, concurrency: int = 1, env: dict | None = None, wait: bool = True
    ) -> subprocess.Popen:
        """A Celery worker; `env` overrides per worker (its own scratch, as on another host)."""
        index = len(self.workers)
        name = f"w{index}-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
        proc = self._spawn(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker.app",
                "worker",
                "-c",
                str(concurrency),
                "-n",
                name,
                "--without-gossip",
                "--without-mingle",
                "--loglevel",
                "INFO",
            ],
            f"worker-{index}.log",
            env,
        )
        self.workers.append(proc)
        log = self.root / f"worker-{index}.log"
        if wait:
            wait_until(lambda: self._ready(proc, log), 60, what="the worker")
        return proc

    def _ready(self, proc: subprocess.Popen, log: Path) -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"worker exited:\n{self.tail()}")
        return log.exists() and " ready." in log.read_text(errors="ignore")

    def kill_worker(self, proc: subprocess.Popen) -> None:
        """The whole worker at once (main process and pool), like a lost machine."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def client(self, tenant: str = "alpha"):
        from linearize_client import LinearizeClient

        return LinearizeClient(self.url, KEYS[tenant], timeout=30)

    def http(self, tenant: str | None = "alpha") -> httpx.Client:
        headers = {"Authorization": f"Bearer {KEYS[tenant]}"} if tenant else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def wait_terminal(self, job_id: str, timeout: float = 180.0, tenant: str = "alpha"):
        with self.client(tenant) as client:
            try:
                return client.wait(job_id, timeout=timeout, poll_s=0.3)
            except TimeoutError:
                raise AssertionError(f"job {job_id} not terminal:\n{self.tail()}") from None

    def tail(self, lines: int = 40) -> str:
        out = []
        for log in self.logs:
            if log.exists():
                text = log.read_text(errors="ignore").splitlines()[-lines:]
                out.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(out)

    def stop(self) -> None:
        procs = [p for p in [*self.workers, self.api] if p is not None]
        for proc in procs:
            if proc.poll() is None:
                with _suppress():
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with _suppress():
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], ProcessLookupError)


def lease_pid(job_events) -> int | None:
    """The pool process pid from the latest `running` event ("attempt N on host:pid:token")."""
    for event in reversed(job_events):
        if event.type == "status" and event.status == "running":
            match = re.search(r" on [^:]+:(\d+):", event.message)
            if match:
                return int(match.group(1))
    return None
