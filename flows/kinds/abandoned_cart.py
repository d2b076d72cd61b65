"""Abandoned cart: a cart with items, untouched for a while, and no order since."""

from datetime import datetime, timedelta
from typing import Literal

from pydantic import model_validator
from sqlalchemy import exists, select
from sqlmodel import col

from flows.kinds.base import DueQuery, Kind, stamp
from flows.spec.common import Duration, Reentry, ReentryRule
from flows.spec.trigger import TriggerBase
from models import CART_OPEN, Cart, CartItem, Order


class Spec(TriggerBase):
    kind: Literal["abandoned_cart"]
    idle_for: Duration
    give_up_after: Duration = timedelta(days=3)
    reentry: ReentryRule = Reentry(mode="cooldown", cooldown=timedelta(days=1))

    @model_validator(mode="after")
    def _window(self) -> "Spec":
        if self.give_up_after <= self.idle_for:
            raise ValueError("give_up_after must be longer than idle_for")
        return self


def due(spec: Spec, now: datetime) -> DueQuery:
    has_items = exists().where(col(CartItem.cart_id) == Cart.id)
    ordered_since = exists().where(
        col(Order.customer_id) == Cart.customer_id, col(Order.placed_at) > Cart.updated_at, col(Order.placed_at) <= now
    )
    return select(col(Cart.customer_id), col(Cart.id).label("ref_id"), col(Cart.updated_at).label("ref_time")).where(
        col(Cart.status) == CART_OPEN,
        col(Cart.updated_at) <= now - spec.idle_for,
        col(Cart.updated_at) > now - spec.give_up_after,
        has_items,
        ~ordered_since,
    )


def occurrence(spec: Spec, now: datetime, ref_id: int | None, ref_time: datetime | None) -> str:
    # The cart's last change is part of the key: editing the cart makes it a new occurrence.
    return f"cart:{ref_id}:{stamp(ref_time)}"


KIND = Kind("abandoned_cart", Spec, "marketing", due, occurrence, reference="cart")
