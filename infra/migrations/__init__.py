"""Alembic migrations of the job store (`python -m infra.migrate upgrade`)."""
