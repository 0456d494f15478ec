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
import logging
import sys
import time
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

log = logging.getLogger(__name__)

FIRST_REVISION = "0001"
UPGRADE_COMMAND = "linearize db upgrade (or: python -m infra.migrate upgrade)"
_MIGRATIONS = Path(__file__).with_name("migrations")


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


def current_revision(connection: Connection) -> str | None:
    """The stamped revision; FIRST_REVISION for a pre-migration store; None when empty."""
    revision = MigrationContext.configure(connection).get_current_revision()
    if revision is None and inspect(connection).has_table("jobs"):
        return FIRST_REVISION
    return revision


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the database to `revision` (stamping a pre-migration store as the first one)."""
    with engine.begin() as connection:
        stamped = MigrationContext.configure(connection).get_current_revision()
        if stamped is None and inspect(connection).has_table("jobs"):
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
    for attempt in range(5):
        with engine.connect() as connection:
            empty = current_revision(connection) is None
        if not empty:
            break
        try:
            upgrade(engine)
            break
        except (IntegrityError, ProgrammingError, OperationalError) as exc:
            # The API and the worker start together and may race on the first CREATE TABLE.
            if attempt == 4:
                raise
            log.info("schema creation raced (%s); retrying", type(exc).__name__)
            time.sleep(0.2 * (attempt + 1))
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
