"""Webhook outbox (written with the job's final state) and worker capacity in the heartbeat.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "webhook_outbox",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "job_id",
            sa.String(40),
            sa.ForeignKey("jobs.id", ondelete="CASCADE"),
            nullable=False,
            index=True,
        ),
        sa.Column("job_status", sa.String(16), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("delivered_at", sa.DateTime(), nullable=True),
        sa.Column("given_up_at", sa.DateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
    )
    op.create_index(
        "ix_webhook_outbox_pending",
        "webhook_outbox",
        ["delivered_at", "given_up_at", "next_attempt_at"],
    )
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("memory_bytes", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("scratch_free_bytes", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("device", sa.String(64), nullable=True))
        batch.add_column(sa.Column("device_memory_bytes", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        for column in ("device_memory_bytes", "device", "scratch_free_bytes", "memory_bytes"):
            batch.drop_column(column)
    op.drop_index("ix_webhook_outbox_pending", table_name="webhook_outbox")
    op.drop_table("webhook_outbox")
