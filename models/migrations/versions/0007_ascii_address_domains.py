"""Addresses in one form: the domain in its ASCII (IDNA) form, a non-ASCII local part lower-cased.

Ingest used to keep ``kunde@bücher.de`` as given: no relay takes it in an envelope, so
every run failed to send it, and a bounce or unsubscribe naming ``kunde@xn--bcher-kva.de``
missed it. Customers, sends, suppressions and feedback are rewritten with
``models.types.stored_address``; a suppression already held in the ASCII form keeps its
row (the other is dropped), and a send whose rewritten address would meet another send of
the same mailbox and occurrence keeps its old spelling (it was never sent).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-16 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from models.types import stored_address

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (table, key column, whether the table keeps addresses lower-cased)
TABLES = (("customers", "id", False), ("sends", "id", False), ("feedback", "id", True), ("suppressions", "email", True))


def upgrade() -> None:
    bind = op.get_bind()
    octets = "octet_length(email)" if bind.dialect.name == "postgresql" else "length(CAST(email AS BLOB))"
    for table, key, lowered in TABLES:
        rows = bind.execute(sa.text(f"SELECT {key}, email FROM {table} WHERE length(email) <> {octets}")).all()
        for row_key, email in rows:
            address = stored_address(email)
            address = address.lower() if lowered else address
            if address == email:
                continue
            if table == "suppressions":
                taken = bind.execute(sa.text("SELECT 1 FROM suppressions WHERE email = :e"), {"e": address}).first()
                if taken:
                    bind.execute(sa.text("DELETE FROM suppressions WHERE email = :e"), {"e": email})
                    continue
            savepoint = bind.begin_nested()
            try:
                bind.execute(sa.text(f"UPDATE {table} SET email = :new WHERE {key} = :key"),
                             {"new": address, "key": row_key})
                savepoint.commit()
            except sa.exc.IntegrityError:  # the same mailbox's send for the same occurrence
                savepoint.rollback()


def downgrade() -> None:
    """The ASCII form is the same address: nothing to undo."""
