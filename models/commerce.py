"""Carts, their items, and completed orders: the facts behind cart reminders and stages."""

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, Index, UniqueConstraint
from sqlmodel import Field, Relationship, SQLModel

from models.types import UtcDateTime, utcnow

CART_OPEN = "open"
CART_ORDERED = "ordered"


class Cart(SQLModel, table=True):
    __tablename__ = "carts"
    __table_args__ = (Index("ix_carts_status_updated", "status", "updated_at"),)

    id: int | None = Field(default=None, primary_key=True)
    external_id: str = Field(max_length=255, unique=True, index=True)
    customer_id: int = Field(foreign_key="customers.id", index=True)
    currency: str = Field(default="EUR", max_length=3)
    status: str = Field(default=CART_OPEN, max_length=16)
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UtcDateTime(), nullable=False))
    updated_at: datetime = Field(default_factory=utcnow, sa_column=Column(UtcDateTime(), nullable=False))


class CartItem(SQLModel, table=True):
    __tablename__ = "cart_items"
    __table_args__ = (UniqueConstraint("cart_id", "product_id"),)

    id: int | None = Field(default=None, primary_key=True)
    cart_id: int = Field(foreign_key="carts.id", index=True)
    product_id: str = Field(max_length=255)
    name: str = Field(default="", max_length=500)
    price_cents: int = Field(default=0)
    quantity: int = Field(default=1)
    url: str | None = Field(default=None, max_length=2000)
    image_url: str | None = Field(default=None, max_length=2000)
    # An item may belong to a cart not yet written: the session writes the cart, then the
    # item with its id, in one flush (ingest adds both without a statement each).
    cart: Cart | None = Relationship()


class Order(SQLModel, table=True):
    __tablename__ = "orders"
    # Covering for the per-customer statistics behind stages: no table lookups.
    __table_args__ = (Index("ix_orders_customer_placed_total", "customer_id", "placed_at", "total_cents"),)

    id: int | None = Field(default=None, primary_key=True)
    external_id: str = Field(max_length=255, unique=True, index=True)
    customer_id: int = Field(foreign_key="customers.id")
    placed_at: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False, index=True))
    total_cents: int = Field(default=0)
    currency: str = Field(default="EUR", max_length=3)
    products: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
