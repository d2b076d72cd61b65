"""The raw event log: every ingested Segment event, once, keyed by its messageId."""

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column
from sqlmodel import Field, SQLModel

from models.types import UtcDateTime, utcnow


class Event(SQLModel, table=True):
    __tablename__ = "events"

    id: int | None = Field(default=None, primary_key=True)
    message_id: str = Field(max_length=255, unique=True, index=True)
    type: str = Field(max_length=16)
    name: str | None = Field(default=None, max_length=255, description="The track event's name.")
    user_id: str = Field(max_length=255, index=True)
    timestamp: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False, index=True))
    payload: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    received_at: datetime = Field(default_factory=utcnow, sa_column=Column(UtcDateTime(), nullable=False))
    source: str | None = Field(default=None, max_length=64,
                               description="Where it came from: a write key's source, or ingest (NULL before 0009).")


class StoreMeta(SQLModel, table=True):
    """Small facts about the store itself, such as when the demo data was seeded."""

    __tablename__ = "store_meta"

    key: str = Field(primary_key=True, max_length=64)
    value: str = Field(max_length=1000)
