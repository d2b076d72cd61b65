"""Outcomes: engagements (clicks, opens), attributions, each send's tracked links, held-out sends,
and the customer's tracking opt-out and erasure.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-17 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

import models.types

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('attributions',
    sa.Column('order_id', sa.Integer(), nullable=False),
    sa.Column('customer_id', sa.Integer(), nullable=False),
    sa.Column('placed_at', models.types.UtcDateTime(), nullable=False),
    sa.Column('total_cents', sa.Integer(), nullable=False),
    sa.Column('currency', sqlmodel.sql.sqltypes.AutoString(length=3), nullable=False),
    sa.Column('send_id', sa.Integer(), nullable=True),
    sa.Column('trigger', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('stage', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('template', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
    sa.Column('basis', sqlmodel.sql.sqltypes.AutoString(length=8), nullable=False),
    sa.Column('touched_at', models.types.UtcDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['customer_id'], ['customers.id'], ),
    sa.ForeignKeyConstraint(['order_id'], ['orders.id'], ),
    sa.ForeignKeyConstraint(['send_id'], ['sends.id'], ),
    sa.PrimaryKeyConstraint('order_id')
    )
    with op.batch_alter_table('attributions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_attributions_customer_id'), ['customer_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_attributions_placed_at'), ['placed_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_attributions_send_id'), ['send_id'], unique=False)
        batch_op.create_index('ix_attributions_trigger_placed', ['trigger', 'placed_at'], unique=False)

    op.create_table('engagements',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('send_id', sa.Integer(), nullable=False),
    sa.Column('customer_id', sa.Integer(), nullable=False),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=8), nullable=False),
    sa.Column('link', sa.Integer(), nullable=False),
    sa.Column('at', models.types.UtcDateTime(), nullable=False),
    sa.Column('machine', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('repeats', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['customer_id'], ['customers.id'], ),
    sa.ForeignKeyConstraint(['send_id'], ['sends.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('engagements', schema=None) as batch_op:
        batch_op.create_index('ix_engagements_customer_at', ['customer_id', 'at'], unique=False)
        batch_op.create_index('ix_engagements_send_link_at', ['send_id', 'link', 'at'], unique=False)

    with op.batch_alter_table('customers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('untracked_at', models.types.UtcDateTime(), nullable=True))
        batch_op.add_column(sa.Column('forgotten_at', models.types.UtcDateTime(), nullable=True))

    with op.batch_alter_table('sends', schema=None) as batch_op:
        batch_op.add_column(sa.Column('links', sa.Text(), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('sends', schema=None) as batch_op:
        batch_op.drop_column('links')

    with op.batch_alter_table('customers', schema=None) as batch_op:
        batch_op.drop_column('forgotten_at')
        batch_op.drop_column('untracked_at')

    with op.batch_alter_table('engagements', schema=None) as batch_op:
        batch_op.drop_index('ix_engagements_send_link_at')
        batch_op.drop_index('ix_engagements_customer_at')

    op.drop_table('engagements')
    with op.batch_alter_table('attributions', schema=None) as batch_op:
        batch_op.drop_index('ix_attributions_trigger_placed')
        batch_op.drop_index(batch_op.f('ix_attributions_send_id'))
        batch_op.drop_index(batch_op.f('ix_attributions_placed_at'))
        batch_op.drop_index(batch_op.f('ix_attributions_customer_id'))

    op.drop_table('attributions')
