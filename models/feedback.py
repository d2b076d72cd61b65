"""What came back after a send: bounces and complaints, each report recorded once.

A report arrives at the SMTP reply (``source='smtp'``), later as a delivery status
notification or feedback-loop report read by ``lifecycle bounces`` (``dsn``, ``arf``),
or from a provider's webhook (``ses``, ``postmark``). ``report_id`` makes reading the
same report twice change nothing. Soft bounces are counted per address from here.
"""

from datetime import datetime
from enum import StrEnum

from sqlalchemy import Column, Index, func
from sqlmodel import Field, SQLModel

from models.types import UtcDateTime, utcnow


class FeedbackKind(StrEnum):
    HARD_BOUNCE = "hard_bounce"  # the address does not exist: suppressed at once
    SOFT_BOUNCE = "soft_bounce"  # the mailbox refused for now (full, disabled): counted per address
    MESSAGE_FAILURE = "message_failure"  # the message or the relay failed (policy, size, content): never the address
    COMPLAINT = "complaint"  # the recipient reported the mail as spam: suppressed at once


class Feedback(SQLModel, table=True):
    __tablename__ = "feedback"
    __table_args__ = (Index("ix_feedback_email_kind_occurred", func.lower(Column("email")), "kind", "occurred_at"),)

    id: int | None = Field(default=None, primary_key=True)
    report_id: str = Field(max_length=255, unique=True, description="Idempotency: source and its own id.")
    send_key: str | None = Field(default=None, max_length=255, index=True)
    trigger: str | None = Field(default=None, max_length=64)
    email: str = Field(max_length=320)
    kind: str = Field(max_length=16)
    status: str = Field(default="", max_length=16, description="RFC 3463 enhanced status code, e.g. 5.1.1.")
    diagnostic: str = Field(default="", max_length=1000)
    source: str = Field(max_length=16, description="smtp, dsn, arf, ses or postmark.")
    occurred_at: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False))
    recorded_at: datetime = Field(default_factory=utcnow, sa_column=Column(UtcDateTime(), nullable=False))
