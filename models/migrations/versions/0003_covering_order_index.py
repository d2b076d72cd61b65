"""Covering order index: a customer's order statistics (stages) read from the index alone.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 12:40:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("orders", schema=None) as batch_op:
        batch_op.create_index("ix_orders_customer_placed_total", ["customer_id", "placed_at", "total_cents"],
                              unique=False)
        batch_op.drop_index("ix_orders_customer_placed")


def downgrade() -> None:
    with op.batch_alter_table("orders", schema=None) as batch_op:
        batch_op.create_index("ix_orders_customer_placed", ["customer_id", "placed_at"], unique=False)
        batch_op.drop_index("ix_orders_customer_placed_total")
