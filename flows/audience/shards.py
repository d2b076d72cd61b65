"""A run's audience in slices: each customer in exactly one shard, whatever the step.

A customer's shard is a stable hash of their id (Knuth's multiplicative hash: the high
bits of ``id * 2654435761`` modulo 2**32, the id first brought below 2**31) modulo the
shard count. The id alone would follow
whatever pattern the shop's ids have: a store whose every fourth customer has no order
would give one shard of four nobody to mail. The customer records whose mailbox another
record shares (few) all go to shard 0, because one mail per mailbox is decided within one
pass (``query._InRun.mailbox``), so records sharing one must never be in two. Whoever
splits the run reads those records once (``query.shared_records``) and every shard carries
them, so all shards agree even while the store changes.

A shard is a test of the customer's id alone, so it applies to any row that names a
customer, as early as the query can: to a kind's due rows, to a journey step's ledger rows,
to the deferrals a pass closes. It is one SQL predicate (``Shard.where``) and one Python
test (``Shard.holds``), and the two agree: tests check one against the other.
"""

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, bindparam, case, literal, true

_GOLDEN = 2654435761  # about 2**32 / the golden ratio, odd: a bijection of 32-bit words
_WORD = 2**32
_HALF = 2**31
_LOW = 2**16


def spread(customer_id: int) -> int:
    """The id scattered over 16 bits, the same in Python as in SQL for every 64-bit id. The
    id is first brought into ``[0, 2**31)`` (SQL's ``%`` keeps a negative sign; the product
    then stays below 2**63), and the high bits of the product are kept: its low bits follow
    the id's own (``id * odd`` is ``id`` modulo any power of two)."""
    return (customer_id % _HALF + _HALF) % _HALF * _GOLDEN % _WORD // _LOW


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based), with the records and mailboxes that several
    customer records share."""

    index: int
    count: int
    members: frozenset[int] = field(default=frozenset(), repr=False)  # records sharing a mailbox: shard 0
    shared: frozenset[str] = field(default=frozenset(), repr=False)  # their mailboxes (``query._InRun.mailbox``)

    def __post_init__(self) -> None:
        if not (self.count >= 1 and 0 <= self.index < self.count):
            raise ValueError(f"shard {self.index} of {self.count}: expected 0 <= index < count")

    @property
    def label(self) -> str:
        """As people count them, from 1: ``2/4``."""
        return f"{self.index + 1}/{self.count}"

    def holds(self, customer_id: int) -> bool:
        return (0 if customer_id in self.members else spread(customer_id) % self.count) == self.index

    def where(self, customer_id: Any) -> ColumnElement[bool]:
        """The SQL test for a row naming the customer in ``customer_id`` (a column)."""
        if self.count == 1:
            return true()
        half = literal(_HALF)
        home: ColumnElement[Any] = ((customer_id % half + half) % half * literal(_GOLDEN) % literal(_WORD)
                                    // literal(_LOW) % self.count)
        if self.members:
            # Integers written into the statement: no bound-parameter limit, however many.
            listed: Any = bindparam("shard_members", sorted(self.members), expanding=True, literal_execute=True,
                               unique=True)
            home = case((customer_id.in_(listed), literal(0)), else_=home)
        held: ColumnElement[bool] = home == self.index
        return held


def split(count: int, members: frozenset[int] = frozenset(), shared: frozenset[str] = frozenset()) -> list[Shard]:
    """Every shard of a run split ``count`` ways: together they hold each customer once."""
    return [Shard(index, count, members, shared) for index in range(count)]
