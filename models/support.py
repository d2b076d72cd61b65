"""Complaints: received from the shop's help desk, acknowledged by the complaint trigger."""

from datetime import datetime

from sqlalchemy import Column
from sqlmodel import Field, SQLModel

from models.types import UtcDateTime


class Complaint(SQLModel, table=True):
    __tablename__ = "complaints"

    id: int | None = Field(default=None, primary_key=True)
    external_id: str = Field(max_length=255, unique=True, index=True)
    customer_id: int = Field(foreign_key="customers.id", index=True)
    subject: str = Field(default="", max_length=500)
    received_at: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False, index=True))
    answered_at: datetime | None = Field(default=None, sa_column=Column(UtcDateTime()))
