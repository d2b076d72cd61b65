"""The consent record: every change of a customer's marketing consent, so consent stays provable."""

from datetime import datetime
from enum import StrEnum

from sqlalchemy import Column
from sqlmodel import Field, SQLModel

from models.types import UtcDateTime, utcnow


class ConsentChangeKind(StrEnum):
    REQUESTED = "requested"  # an opt-in that still needs confirming (double opt-in)
    CONFIRMED = "confirmed"
    WITHDRAWN = "withdrawn"  # unsubscribed from all marketing
    CATEGORIES = "categories"  # left or rejoined single categories (detail names them)


class ConsentChange(SQLModel, table=True):
    """Append-only. ``request`` is the consent request a change answers (``flows.consent.request_id``:
    the same string as the confirmation mail's occurrence in the ledger), so a confirmation
    leads back to the very mail whose link was used."""

    __tablename__ = "consent_changes"

    id: int | None = Field(default=None, primary_key=True)
    customer_id: int = Field(foreign_key="customers.id", index=True)
    at: datetime = Field(default_factory=utcnow, sa_column=Column(UtcDateTime(), nullable=False))
    change: str = Field(max_length=16)
    source: str = Field(max_length=64, description="Where it came from: the link, the page, the shop's event.")
    request: str | None = Field(default=None, max_length=64)
    detail: str = Field(default="", max_length=500)
