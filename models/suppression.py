"""Addresses we must not write to, whatever a trigger says."""

from datetime import datetime
from enum import StrEnum

from sqlalchemy import Column
from sqlmodel import Field, SQLModel

from models.types import UtcDateTime, stored_address, utcnow


class SuppressionReason(StrEnum):
    UNSUBSCRIBED = "unsubscribed"
    HARD_BOUNCE = "hard_bounce"
    SOFT_BOUNCE = "soft_bounce"  # too many soft bounces within the window (LIFECYCLE_SOFT_BOUNCE_*)
    SPAM_COMPLAINT = "spam_complaint"
    MANUAL = "manual"


class Suppression(SQLModel, table=True):
    __tablename__ = "suppressions"

    email: str = Field(primary_key=True, max_length=320, description="Lower-cased address.")
    reason: str = Field(max_length=32)
    detail: str = Field(default="", max_length=1000)
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UtcDateTime(), nullable=False))


def suppression_key(address: str) -> str:
    """The one form a suppression is kept and looked up under, wherever the address came
    from (a customer record, a bounce report, an operator typing ``Kunde@Bücher.de``): the
    stored address (ASCII domain) lower-cased."""
    return stored_address(address.strip()).lower()
