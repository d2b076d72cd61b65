"""The consent record: every change of marketing consent with its time, source and request.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-15 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

import models.types

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "consent_changes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("customer_id", sa.Integer(), nullable=False),
        sa.Column("at", models.types.UtcDateTime(), nullable=False),
        sa.Column("change", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("source", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("request", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("detail", sqlmodel.sql.sqltypes.AutoString(length=500), nullable=False),
        sa.ForeignKeyConstraint(["customer_id"], ["customers.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_consent_changes_customer_id", "consent_changes", ["customer_id"], unique=False)
    # What the store already knew becomes the record's first entries, marked as carried over.
    op.execute("""
        INSERT INTO consent_changes (customer_id, at, change, source, request, detail)
        SELECT id, consent_at, 'confirmed', COALESCE(consent_source, 'unknown'), NULL, 'recorded before the consent record'
        FROM customers WHERE marketing_consent AND consent_at IS NOT NULL
    """)  # noqa: E501 -- the SQL as it ran
    op.execute("""
        INSERT INTO consent_changes (customer_id, at, change, source, request, detail)
        SELECT id, consent_requested_at, 'requested', COALESCE(consent_source, 'unknown'), NULL,
               'recorded before the consent record'
        FROM customers WHERE NOT marketing_consent AND consent_requested_at IS NOT NULL
    """)
    op.execute("""
        INSERT INTO consent_changes (customer_id, at, change, source, request, detail)
        SELECT id, consent_withdrawn_at, 'withdrawn', 'unknown', NULL, 'recorded before the consent record'
        FROM customers WHERE consent_withdrawn_at IS NOT NULL
    """)


def downgrade() -> None:
    op.drop_index("ix_consent_changes_customer_id", table_name="consent_changes")
    op.drop_table("consent_changes")
