"""Feedback (bounces and complaints reported later) and addresses as recipients.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 22:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

import models.types

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("report_id", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
        sa.Column("send_key", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
        sa.Column("trigger", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("email", sqlmodel.sql.sqltypes.AutoString(length=320), nullable=False),
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("status", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("diagnostic", sqlmodel.sql.sqltypes.AutoString(length=1000), nullable=False),
        sa.Column("source", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("occurred_at", models.types.UtcDateTime(), nullable=False),
        sa.Column("recorded_at", models.types.UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("report_id"),
    )
    op.create_index("ix_feedback_send_key", "feedback", ["send_key"], unique=False)
    op.create_index("ix_feedback_email_kind_occurred", "feedback", [sa.text("lower(email)"), "kind", "occurred_at"],
                    unique=False)
    # Before this release a mailbox shared by several customers could get the same occurrence
    # twice (the defect the unique index now prevents): those later rows keep their history
    # under an occurrence of their own, ``…#<id>``.
    op.execute(sa.text(
        "UPDATE sends SET occurrence = occurrence || '#' || CAST(id AS VARCHAR(20)) WHERE id IN ("
        "SELECT id FROM (SELECT id, ROW_NUMBER() OVER (PARTITION BY lower(email), trigger, occurrence ORDER BY id)"
        " AS n FROM sends) AS ranked WHERE n > 1)"))
    op.create_index("ux_sends_address_trigger_occurrence", "sends", [sa.text("lower(email)"), "trigger", "occurrence"],
                    unique=True)
    op.create_index("ix_sends_message_digest", "sends", [sa.text("substr(message_id, 2, 32)")], unique=False)
    op.create_index("ix_customers_address", "customers", [sa.text("lower(email)")], unique=False)


def downgrade() -> None:
    op.drop_index("ix_customers_address", table_name="customers")
    op.drop_index("ix_sends_message_digest", table_name="sends")
    op.drop_index("ux_sends_address_trigger_occurrence", table_name="sends")
    op.drop_index("ix_feedback_email_kind_occurred", table_name="feedback")
    op.drop_index("ix_feedback_send_key", table_name="feedback")
    op.drop_table("feedback")
