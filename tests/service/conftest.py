"""Fixtures for the service tests: real Redis, real PostgreSQL and SQLite, real uvicorn and
Celery processes, and a tiny random model so each job takes seconds. Loopback only.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3_helpers import S3Server
from stack_helpers import (
    PG_DB,
    PG_SERVER,
    SHARED_REDIS,
    WIKITEXT,
    RedisServer,
    Stack,
    drop_pg_schema,
    pg_admin_url,
    pg_schema_url,
    stack_env,
)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """moto's standalone server (tests/service/s3_helpers.py), shared by the bucket tests."""
    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log").start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    """A model root holding `tiny-llama` (6 layers, hidden 32, byte tokenizer, safetensors) and
    `tiny-llava` (the same backbone in a llava wrapper with a tiny vision tower, hub layout)."""
    from tiny_models import save_tiny_model
    from tiny_multimodal import save_multimodal_model

    root = tmp_path_factory.mktemp("models")
    save_tiny_model("llama", root / "tiny-llama")
    save_multimodal_model("llava", root / "tiny-llava")
    save_tiny_model("qwen3_moe", root / "tiny-qwen3-moe")  # experts stored one tensor each
    return root


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """~200 KB of English text (the shared wikitext file when present)."""
    path = tmp_path_factory.mktemp("data") / "text.txt"
    if WIKITEXT.is_file():
        with WIKITEXT.open("rb") as fh:
            raw = fh.read(200_000)
        path.write_text(raw.decode("utf-8", errors="ignore"), encoding="utf-8")
    else:
        words = [
            "the",
            "model",
            "replaces",
            "nearly",
            "linear",
            "blocks",
            "by",
            "fitted",
            "maps",
            "and",
            "measures",
            "the",
            "cost",
        ]
        # Drawn, not cycled: a cycled text repeats its windows, and the engine refuses evaluation
        # windows that also occur in calibration (the cancel test's long job then fails at once).
        draw = random.Random(0)
        path.write_text(" ".join(draw.choice(words) for _ in range(40_000)), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def pg_database() -> str:
    """The `linearize_test` database (created once); tests isolate themselves by schema."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    admin = create_engine(pg_admin_url(), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            exists = conn.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": PG_DB}
            ).scalar()
            if not exists:
                # another test process (pytest-xdist) may create it between the two statements
                with contextlib.suppress(IntegrityError, ProgrammingError):
                    conn.execute(text(f"CREATE DATABASE {PG_DB}"))
    except Exception as exc:  # .ci/run starts PostgreSQL; a missing one is a setup error
        pytest.fail(f"PostgreSQL is not reachable at {PG_SERVER}: {exc}")
    finally:
        admin.dispose()
    return f"{PG_SERVER}/{PG_DB}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> Iterator[str]:
    """Each store test runs against both backends."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.sqlite'}"
        return
    pg = request.getfixturevalue("pg_database")
    url, schema = pg_schema_url(pg)
    yield url
    drop_pg_schema(pg, schema)


@pytest.fixture(scope="session")
def shared_redis() -> str:
    import redis

    try:
        redis.Redis.from_url(SHARED_REDIS, socket_connect_timeout=2).ping()
    except Exception as exc:
        pytest.fail(f"Redis is not reachable at {SHARED_REDIS} (.ci/run starts one): {exc}")
    return SHARED_REDIS


@pytest.fixture
def private_redis(tmp_path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def shared_stack(tmp_path_factory, model_root, pg_database, shared_redis) -> Iterator[Stack]:
    """One API + one worker process on PostgreSQL and the shared Redis, for the flow tests.

    The worker keeps its pool process between tasks (max tasks per child 0) so the tiny jobs
    of the load test do not each pay the torch import; the crash tests use their own stacks
    with the production setting of 1.
    """
    url, schema = pg_schema_url(pg_database)
    root = tmp_path_factory.mktemp("shared-stack")
    stack = Stack(
        root,
        stack_env(
            root,
            broker_url=shared_redis,
            database_url=url,
            model_root=model_root,
            LINEARIZE_WORKER_MAX_TASKS_PER_CHILD=0,
        ),
    )
    try:
        stack.start_api()
        stack.start_worker(concurrency=1)
        yield stack
    finally:
        stack.stop()
        drop_pg_schema(pg_database, schema)


@pytest.fixture(scope="session")
def shared_dataset(shared_stack, text_file) -> str:
    with shared_stack.client() as client:
        return client.upload_dataset(text_file).id
