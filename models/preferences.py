"""Per-category opt-outs: a customer may leave win-back campaigns and still get cart reminders."""

from datetime import datetime

from sqlalchemy import Column
from sqlmodel import Field, SQLModel

from models.types import UtcDateTime, utcnow


class CategoryOptOut(SQLModel, table=True):
    __tablename__ = "category_opt_outs"

    customer_id: int = Field(foreign_key="customers.id", primary_key=True)
    category: str = Field(primary_key=True, max_length=32)
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UtcDateTime(), nullable=False))
