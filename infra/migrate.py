"""Schema migrations of the job store (Alembic), and the check that the API and workers run.

    python -m infra.migrate upgrade     # or: linearize db upgrade
    python -m infra.migrate current     # the database's revision and this release's head

A database of the release before migrations (tables made by create_all, no alembic_version) is
the first revision: `upgrade` stamps it 0001 and goes on from there. A fresh, empty database is
created at head by whichever process starts first; a database at any other revision than head is
refused with the command that upgrades it (or, when it is ahead, the advice to upgrade linearize).
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)

FIRST_REVISION = "0001"
UPGRADE_COMMAND = "linearize db upgrade (or: python -m infra.migrate upgrade)"
_MIGRATIONS = Path(__file__).with_name("migrations")
_LOCK_KEY = 0x6C696E65  # the PostgreSQL advisory lock of migrations ("line")


class SchemaMismatch(RuntimeError):
    """The database's schema revision is not the one this release runs on."""


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None, "infra/migrations has no revisions"
    return head


def _pre_migration(connection: Connection) -> bool:
    """Tables of the release before migrations, and no version table. (A version table without
    a row is another process creating the store right now: that store counts as empty.)"""
    found = inspect(connection)
    return found.has_table("jobs") and not found.has_table("alembic_version")


def current_revision(connection: Connection) -> str | None:
    """The stamped revision; FIRST_REVISION for a pre-migration store; None when empty."""
    revision = MigrationContext.configure(connection).get_current_revision()
    if revision is None and _pre_migration(connection):
        return FIRST_REVISION
    return revision


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """One process at a time migrates or checks: the API and the workers may start together on
    an empty store, and SQLite commits each DDL statement on its own."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _LOCK_KEY})
            connection.commit()
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _LOCK_KEY})
                connection.commit()
        return
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    with open(f"{database}.migrate-lock", "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the database to `revision` (stamping a pre-migration store as the first one)."""
    with _migration_lock(engine):
        _upgrade(engine, revision)


def _upgrade(engine: Engine, revision: str) -> None:
    with engine.begin() as connection:
        if _pre_migration(connection):
            command.stamp(_config(connection), FIRST_REVISION)
        command.upgrade(_config(connection), revision)


def check_schema(engine: Engine) -> None:
    """Refuse a database that is behind or ahead of this release, naming the way out."""
    head = head_revision()
    with engine.connect() as connection:
        found = current_revision(connection)
    if found == head:
        return
    if found is not None and _is_known(found):
        raise SchemaMismatch(
            f"the job store is at schema revision {found}, this release needs {head}: "
            f"run `{UPGRADE_COMMAND}` with the same LINEARIZE_DATABASE_URL"
        )
    raise SchemaMismatch(
        f"the job store is at schema revision {found}, which this release ({head}) does not "
        "know: it was migrated by a newer linearize; upgrade linearize on this host"
    )


def _is_known(revision: str) -> bool:
    try:
        return ScriptDirectory.from_config(_config()).get_revision(revision) is not None
    except Exception:  # alembic raises its own errors for an unknown id
        return False


def prepare_schema(engine: Engine) -> None:
    """At process start: an empty database is created at head; any other must be at head."""
    with _migration_lock(engine):
        with engine.connect() as connection:
            empty = current_revision(connection) is None
        if empty:
            _upgrade(engine, "head")
        check_schema(engine)


def main(argv: list[str] | None = None) -> int:
    from infra.db import make_engine
    from infra.settings import get_settings

    parser = argparse.ArgumentParser(prog="python -m infra.migrate", description=__doc__)
    parser.add_argument("action", choices=["upgrade", "current"])
    parser.add_argument("--url", help="SQLAlchemy URL; default: LINEARIZE_DATABASE_URL")
    args = parser.parse_args(argv)
    engine = make_engine(args.url or get_settings().resolved_database_url)
    try:
        if args.action == "upgrade":
            upgrade(engine)
        with engine.connect() as connection:
            found = current_revision(connection)
    finally:
        engine.dispose()
    head = head_revision()
    state = "up to date" if found == head else "behind or ahead: see `upgrade`"
    sys.stdout.write(f"job store revision {found or 'none (empty)'}; head {head}: {state}\n")
    return 0 if found == head else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
