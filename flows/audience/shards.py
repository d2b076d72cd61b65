"""A run's audience in slices: each customer in exactly one shard, whatever the step.

A customer's shard is their id modulo the shard count, except for customers whose mailbox
several records share (few): those all go to shard 0, because one mail per mailbox is
decided within one pass (``query._InRun.mailbox``), so records sharing one must never be in
two. The shared mailboxes are read once, by whoever splits the run, and travel with every
shard, so all shards agree on them even while the store changes.

The same slice is one SQL predicate (``Shard.where``, for the audience and for the
deferrals a pass closes) and one Python test (``Shard.holds``), and the two agree: tests
check both against each other.
"""

from dataclasses import dataclass, field

from sqlalchemy import ColumnElement, String, case, func, literal, true
from sqlmodel import col

from models import Customer
from models.db import one_of


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based), with the mailboxes shared by several records."""

    index: int
    count: int
    shared: frozenset[str] = field(default=frozenset(), repr=False)

    def __post_init__(self) -> None:
        if not (self.count >= 1 and 0 <= self.index < self.count):
            raise ValueError(f"shard {self.index} of {self.count}: expected 0 <= index < count")

    @property
    def label(self) -> str:
        """As people count them, from 1: ``2/4``."""
        return f"{self.index + 1}/{self.count}"

    def holds(self, customer_id: int, email: str | None) -> bool:
        mailbox = (email or "").lower()
        home = 0 if mailbox and mailbox in self.shared else customer_id % self.count
        return home == self.index

    def where(self, dialect: str) -> ColumnElement[bool]:
        """The SQL test for a row of ``customers`` (joined to whatever a query reads)."""
        if self.count == 1:
            return true()
        email = col(Customer.email)
        home: ColumnElement[int | None] = col(Customer.id) % self.count
        if self.shared:
            home = case((one_of(func.lower(email, type_=String()), self.shared, dialect), literal(0)), else_=home)
        held: ColumnElement[bool] = home == self.index
        return held


def split(count: int, shared: frozenset[str]) -> list[Shard]:
    """Every shard of a run split ``count`` ways: together they hold each customer once."""
    return [Shard(index, count, shared) for index in range(count)]
