"""Identities: the ids a customer has been known by, and the groups (accounts, companies) they belong to."""

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, select
from sqlmodel import Field, Session, SQLModel, col

from models.customer import Customer
from models.types import UtcDateTime, utcnow


class CustomerAlias(SQLModel, table=True):
    """Another id of a customer: a merged guest's userId, an anonymousId, a Segment ``alias``'s
    previousId. An event for it lands on the customer, and so does a link in an old mail."""

    __tablename__ = "customer_aliases"

    external_id: str = Field(primary_key=True, max_length=255, description="The other userId or anonymousId.")
    customer_id: int = Field(foreign_key="customers.id", index=True)
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UtcDateTime(), nullable=False))


class GroupMembership(SQLModel, table=True):
    """A Segment ``group`` call: the customer belongs to this group, with the group's latest traits."""

    __tablename__ = "customer_groups"

    customer_id: int = Field(foreign_key="customers.id", primary_key=True)
    group_id: str = Field(primary_key=True, max_length=255)
    traits: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    updated_at: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False))


def customer_by_id(session: Session, external_id: str, lock: bool = False) -> Customer | None:
    """The customer an id names: their own userId, or one merged into them (an alias).
    ``lock``: ``SELECT … FOR UPDATE`` (PostgreSQL; SQLite's write transaction is the lock)."""
    query = select(Customer).where(col(Customer.external_id) == external_id)
    customer = session.execute(query.with_for_update() if lock else query).scalar_one_or_none()
    if customer is None:
        alias = session.get(CustomerAlias, external_id)
        customer = session.get(Customer, alias.customer_id, with_for_update=lock or None) if alias else None
    return customer
