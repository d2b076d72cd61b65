"""Journeys: each send's step, experiment arm and experiment, its journey's entry moment, the
index a step's audience reads, and the winner rule's looks.

A row written before journeys has the empty step: the trigger's one mail, its key unchanged.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-19 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

import models.types

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("sends") as batch:
        batch.add_column(sa.Column("step", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False,
                                   server_default=""))
        batch.add_column(sa.Column("variant", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False,
                                   server_default=""))
        batch.add_column(sa.Column("experiment", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False,
                                   server_default=""))
        batch.add_column(sa.Column("entered_at", models.types.UtcDateTime(), nullable=True))
        batch.create_index("ix_sends_trigger_step_evaluated", ["trigger", "step", "evaluated_at"], unique=False)
    op.create_table(
        "experiment_looks",
        sa.Column("trigger", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("step", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("salt", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("look", sa.Integer(), nullable=False),
        sa.Column("checkpoint", sa.Integer(), nullable=False),
        sa.Column("winner", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("reason", sqlmodel.sql.sqltypes.AutoString(length=1000), nullable=False),
        sa.Column("figures", sa.Text(), nullable=False),
        sa.Column("decided_at", models.types.UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("trigger", "step", "salt", "look"),
    )


def downgrade() -> None:
    op.drop_table("experiment_looks")
    with op.batch_alter_table("sends") as batch:
        batch.drop_index("ix_sends_trigger_step_evaluated")
        batch.drop_column("entered_at")
        batch.drop_column("experiment")
        batch.drop_column("variant")
        batch.drop_column("step")
