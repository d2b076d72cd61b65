"""Column types shared by the customer store and the send ledger."""

from datetime import UTC, datetime
from typing import Any

import idna
from sqlalchemy import DateTime
from sqlalchemy.types import TypeDecorator


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware datetimes stored as naive UTC.

    SQLite has no time zones and PostgreSQL's ``timestamptz`` would make the two
    back ends compare differently; storing naive UTC everywhere and attaching UTC
    on the way out keeps every comparison identical on both.
    """

    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


def stored_address(address: str) -> str:
    """An address as the store keeps, compares and sends it: the domain in its ASCII (IDNA)
    form (``kunde@Bücher.de`` → ``kunde@xn--bcher-kva.de``), a local part that is not ASCII
    lower-cased (SQLite's ``lower()`` only folds ASCII; Python's and PostgreSQL's fold Ü too,
    and suppressions, shared mailboxes and the ledger's unique index must find one form).
    An ASCII local part keeps its case, as before; a domain IDNA refuses is left as it is."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address
    if not domain.isascii() or "xn--" in domain.lower():
        try:
            domain = idna.encode(domain, uts46=True).decode("ascii")
        except idna.IDNAError:
            pass
    else:
        domain = domain.lower()
    return f"{local if local.isascii() else local.lower()}@{domain}"


def display_address(address: str) -> str:
    """The address as its owner writes it: the domain's A-labels back in Unicode (for
    display only; the store and the envelope keep ``stored_address``)."""
    local, at, domain = address.rpartition("@")
    if not at or "xn--" not in domain.lower():
        return address
    try:
        return f"{local}@{idna.decode(domain)}"
    except idna.IDNAError:
        return address
