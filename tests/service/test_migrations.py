"""Schema migrations on SQLite and PostgreSQL: history kept across upgrades, mismatches refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData, insert, text

from infra.db import Base, init_schema, make_engine
from infra.migrate import FIRST_REVISION, SchemaMismatch, current_revision, head_revision, upgrade
from infra.store import Store

T0 = datetime(2026, 11, 1, 12, 0, 0)


@pytest.fixture
def engine(database_url):
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def _job(job_id: str, status: str, **extra) -> dict:
    row = dict(
        id=job_id,
        tenant="alpha",
        kind="compress",
        status=status,
        spec_json=json.dumps({"kind": "compress", "model": "tiny-llama", "layers": 2}),
        labels_json=json.dumps({"team": "ml"}),
        idempotency_key=f"key-{job_id}",
        request_sha256="ab" * 32,
        webhook_url=None,
        created_at=T0,
        attempts=1,
        cancel_requested=False,
        progress_current=3,
        progress_total=7,
        artifacts_expired=False,
        webhook_attempts=0,
    )
    return {**row, **extra}


def _fill_first_revision(engine) -> None:
    """Rows as the first release wrote them, through its own tables (not today's models)."""
    tables = MetaData()
    tables.reflect(engine)
    with engine.begin() as conn:
        for job in (  # one statement each: the rows set different columns
            _job("job_done", "succeeded", report_json='{"ok": 1}', finished_at=T0),
            _job("job_failed", "failed", error_code="bad_input", error_exit_code=2),
            _job("job_queued", "queued", webhook_url="http://hooks.example.com/x"),
        ):
            conn.execute(insert(tables.tables["jobs"]), job)
        conn.execute(
            insert(tables.tables["job_events"]),
            [
                dict(job_id="job_done", ts=T0, type="status", status="queued", stage=None,
                     current=0, total=0, message="submitted", data_json=None),
                dict(job_id="job_done", ts=T0, type="progress", status=None, stage="fit",
                     current=2, total=5, message="fitting", data_json='{"layer": 3}'),
                dict(job_id="job_failed", ts=T0, type="status", status="failed", stage=None,
                     current=0, total=0, message="bad input", data_json=None),
            ],
        )  # fmt: skip
        conn.execute(
            insert(tables.tables["datasets"]),
            [dict(id="ds_1", tenant="alpha", bytes=1234, sha256="cd" * 32, filename="a.txt",
                  path="datasets/ds_1", created_at=T0)],
        )  # fmt: skip


@pytest.mark.parametrize("stamped", [True, False], ids=["alembic", "pre-migration"])
def test_upgrade_first_revision_to_head_keeps_jobs_events_and_datasets(engine, stamped):
    upgrade(engine, FIRST_REVISION)
    if not stamped:  # a store made by the release before migrations: no alembic_version
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE alembic_version"))
    _fill_first_revision(engine)
    with pytest.raises(SchemaMismatch, match="linearize db upgrade"):
        init_schema(engine)

    upgrade(engine)

    init_schema(engine)  # the API and worker now start
    store = Store(engine)
    done = store.get_job("job_done", "alpha")
    assert (done.status, done.report_json, done.progress_current) == ("succeeded", '{"ok": 1}', 3)
    assert json.loads(done.labels_json) == {"team": "ml"}
    assert store.get_job("job_failed").error_exit_code == 2
    assert store.get_job("job_queued").webhook_url == "http://hooks.example.com/x"
    events = store.list_events("job_done", after=None, limit=10)
    assert [(e.type, e.stage, e.current, e.data_json) for e in events] == [
        ("status", None, 0, None),
        ("progress", "fit", 2, '{"layer": 3}'),
    ]
    assert len(store.list_events("job_failed", after=None, limit=10)) == 1
    dataset = store.get_dataset("alpha", "ds_1")
    assert (dataset.bytes, dataset.filename, dataset.created_at) == (1234, "a.txt", T0)
    listed = store.list_jobs("alpha", status=None, after=None, limit=10)
    assert [r.id for r in listed] == ["job_queued", "job_failed", "job_done"]


def test_head_matches_the_models(engine):
    """Every change to infra/db.py ships a migration: head and the models have no difference."""
    init_schema(engine)  # an empty store is created at head
    with engine.connect() as conn:
        assert current_revision(conn) == head_revision()
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


def test_start_refuses_a_schema_from_a_newer_release(engine):
    init_schema(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(SchemaMismatch, match="newer linearize"):
        init_schema(engine)


def test_migrate_command_upgrades_and_reports(database_url, engine):
    from infra.migrate import main

    upgrade(engine, FIRST_REVISION)
    assert main(["current", "--url", database_url]) == 1  # behind
    assert main(["upgrade", "--url", database_url]) == 0
    with engine.connect() as conn:
        assert current_revision(conn) == head_revision()


def _behind(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    engine = make_engine(url)
    upgrade(engine, FIRST_REVISION)
    engine.dispose()
    return url


def test_api_refuses_to_start_on_a_schema_behind_head(tmp_path, model_root, shared_redis):
    from fastapi.testclient import TestClient
    from test_api import make_settings

    from service.main import create_app

    settings = make_settings(tmp_path, model_root, shared_redis, database_url=_behind(tmp_path))
    with (
        pytest.raises(SchemaMismatch, match=r"revision 0001.*linearize db upgrade"),
        TestClient(create_app(settings, reconcile=False)),
    ):
        pass


def test_worker_refuses_to_start_on_a_schema_behind_head(tmp_path, model_root, shared_redis):
    from stack_helpers import REPO, stack_env

    env = stack_env(
        tmp_path, broker_url=shared_redis, database_url=_behind(tmp_path), model_root=model_root
    )
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-c", "1",
         "--without-gossip", "--without-mingle", "--loglevel", "INFO"],
        cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "worker not started" in result.stderr and "linearize db upgrade" in result.stderr
    assert " ready." not in result.stderr


def test_linearize_db_upgrade_migrates_without_torch(tmp_path):
    from stack_helpers import REPO
    from test_packaging import BLOCK_TORCH

    url = _behind(tmp_path)
    code = BLOCK_TORCH + (
        "from linearize.cli import main\n"
        f"code = main(['db', 'upgrade', '--url', {url!r}])\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')]\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert f"revision {head_revision()}; head {head_revision()}: up to date" in result.stdout
    engine = make_engine(url)
    with engine.connect() as conn:
        assert current_revision(conn) == head_revision()
    engine.dispose()


def test_processes_starting_together_on_an_empty_store_all_start(database_url):
    """The API and the workers may create the store at once; the migration lock serializes."""
    import threading

    errors: list[BaseException] = []

    def start() -> None:
        engine = make_engine(database_url)
        try:
            init_schema(engine)
        except BaseException as exc:  # collected: the assertion below names it
            errors.append(exc)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    engine = make_engine(database_url)
    with engine.connect() as conn:
        assert current_revision(conn) == head_revision()
    engine.dispose()
