"""Double opt-in (consent source and pending request) and per-category opt-outs.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 17:15:02.743644
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

import models.types


revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('category_opt_outs',
    sa.Column('customer_id', sa.Integer(), nullable=False),
    sa.Column('category', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('created_at', models.types.UtcDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['customer_id'], ['customers.id'], ),
    sa.PrimaryKeyConstraint('customer_id', 'category')
    )
    with op.batch_alter_table('customers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('consent_source', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch_op.add_column(sa.Column('consent_requested_at', models.types.UtcDateTime(), nullable=True))
        batch_op.create_index(batch_op.f('ix_customers_consent_requested_at'), ['consent_requested_at'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('customers', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_customers_consent_requested_at'))
        batch_op.drop_column('consent_requested_at')
        batch_op.drop_column('consent_source')

    op.drop_table('category_opt_outs')
