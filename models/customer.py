"""Customers: who we may write to, in which language, and since when they consented."""

from datetime import datetime

from sqlalchemy import Column, Index, func
from sqlmodel import Field, SQLModel

from models.types import UtcDateTime, utcnow


class Customer(SQLModel, table=True):
    """Marketing consent is double opt-in: ``marketing_consent`` is True only once confirmed
    (``consent_at``, ``consent_source``); a request still waiting for confirmation has
    ``consent_requested_at`` set and ``marketing_consent`` False."""

    __tablename__ = "customers"
    # Customers sharing an address are one recipient: found by the address as suppressions store it.
    __table_args__ = (Index("ix_customers_address", func.lower(Column("email"))),)

    id: int | None = Field(default=None, primary_key=True)
    external_id: str = Field(max_length=255, unique=True, index=True, description="The shop's userId.")
    email: str | None = Field(default=None, max_length=320, index=True)
    first_name: str | None = Field(default=None, max_length=200)
    last_name: str | None = Field(default=None, max_length=200)
    locale: str = Field(default="en", max_length=35)
    timezone: str | None = Field(default=None, max_length=64)
    marketing_consent: bool = Field(default=False)
    consent_at: datetime | None = Field(default=None, sa_column=Column(UtcDateTime()))
    consent_source: str | None = Field(default=None, max_length=64)
    consent_requested_at: datetime | None = Field(default=None, sa_column=Column(UtcDateTime(), index=True))
    # Set when consent is withdrawn, cleared by a new confirmed consent: merging two records
    # must tell "withdrew" (which wins) from "never asked".
    consent_withdrawn_at: datetime | None = Field(default=None, sa_column=Column(UtcDateTime()))
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UtcDateTime(), nullable=False, index=True))
    last_seen_at: datetime | None = Field(default=None, sa_column=Column(UtcDateTime(), index=True))
    # Left click and open tracking on the preference page: links go straight to their destination.
    untracked_at: datetime | None = Field(default=None, sa_column=Column(UtcDateTime()))
    # Erased on request (``lifecycle forget``): the row stays for the ledger's counts, nothing personal does.
    forgotten_at: datetime | None = Field(default=None, sa_column=Column(UtcDateTime()))
