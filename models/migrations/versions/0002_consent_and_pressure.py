"""Consent and pressure: double opt-in, category opt-outs, deferred sends and frequency caps.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 17:22:51.266390
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
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

    with op.batch_alter_table('sends', schema=None) as batch_op:
        # Existing rows predate service mail in the ledger: they were all marketing.
        batch_op.add_column(sa.Column('category', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False,
                                      server_default='marketing'))
        batch_op.add_column(sa.Column('ref_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('not_before', models.types.UtcDateTime(), nullable=True))
        batch_op.add_column(sa.Column('expires_at', models.types.UtcDateTime(), nullable=True))
        batch_op.create_index(
            'ix_sends_customer_category_evaluated', ['customer_id', 'category', 'evaluated_at'], unique=False
        )
        batch_op.create_index('ix_sends_trigger_status_not_before', ['trigger', 'status', 'not_before'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('sends', schema=None) as batch_op:
        batch_op.drop_index('ix_sends_trigger_status_not_before')
        batch_op.drop_index('ix_sends_customer_category_evaluated')
        batch_op.drop_column('expires_at')
        batch_op.drop_column('not_before')
        batch_op.drop_column('ref_id')
        batch_op.drop_column('category')

    with op.batch_alter_table('customers', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_customers_consent_requested_at'))
        batch_op.drop_column('consent_requested_at')
        batch_op.drop_column('consent_source')

    op.drop_table('category_opt_outs')
