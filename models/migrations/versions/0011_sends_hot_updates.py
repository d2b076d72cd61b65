"""HOT updates of the ledger: ``sends.status`` in no index, and room on each page for a
row's next version.

A send's state changes rewrote every index entry of its row on PostgreSQL, because the
status sat in two indexes: ``ix_sends_status`` and ``ix_sends_trigger_status_not_before``.
The due deferrals are found through a partial index on ``(trigger, not_before)`` instead,
which holds only the rows that were ever deferred; nothing else read the status alone fast
enough to need it. On PostgreSQL inserts fill 45 % of a page (``models.ledger.FILLFACTOR``):
the rest holds each row's next version, which a run's open read transaction keeps beside
the old one, plus its reply. Pages written before keep their rows as they are.

Revision ID: 0011
Revises: 0010
Create Date: 2027-01-12 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DEFERRED = sa.text("not_before IS NOT NULL")


def upgrade() -> None:
    op.create_index("ix_sends_trigger_not_before", "sends", ["trigger", "not_before"], unique=False,
                    postgresql_where=DEFERRED, sqlite_where=DEFERRED)
    op.drop_index("ix_sends_trigger_status_not_before", table_name="sends")
    op.drop_index("ix_sends_status", table_name="sends")
    if op.get_context().dialect.name == "postgresql":
        op.execute("ALTER TABLE sends SET (fillfactor = 45)")


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute("ALTER TABLE sends RESET (fillfactor)")
    op.create_index("ix_sends_status", "sends", ["status"], unique=False)
    op.create_index("ix_sends_trigger_status_not_before", "sends", ["trigger", "status", "not_before"], unique=False)
    op.drop_index("ix_sends_trigger_not_before", table_name="sends")
