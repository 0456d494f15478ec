"""Alembic environment: runs on the connection infra.migrate hands over (config.attributes), so
the SQLite pragmas and the PostgreSQL search path of infra.db.make_engine apply to migrations too."""

from __future__ import annotations

from alembic import context

from infra.db import Base


def run_migrations() -> None:
    connection = context.config.attributes["connection"]
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite cannot ALTER most things in place; batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
