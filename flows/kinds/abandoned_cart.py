"""Abandoned cart: a cart with items, untouched for a while, and no order since."""

from datetime import datetime, timedelta
from typing import Literal

from pydantic import model_validator
from sqlalchemy import Select, exists, select

from flows.kinds.base import Kind, stamp
from flows.spec.common import Duration, Reentry, ReentryRule, TriggerBase
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


def due(spec: Spec, now: datetime) -> Select:
    has_items = exists().where(CartItem.cart_id == Cart.id)
    ordered_since = exists().where(
        Order.customer_id == Cart.customer_id, Order.placed_at > Cart.updated_at, Order.placed_at <= now
    )
    return select(Cart.customer_id, Cart.id.label("ref_id"), Cart.updated_at.label("ref_time")).where(
        Cart.status == CART_OPEN,
        Cart.updated_at <= now - spec.idle_for,
        Cart.updated_at > now - spec.give_up_after,
        has_items,
        ~ordered_since,
    )


def occurrence(spec: Spec, now: datetime, ref_id: int | None, ref_time: datetime | None) -> str:
    # The cart's last change is part of the key: editing the cart makes it a new occurrence.
    return f"cart:{ref_id}:{stamp(ref_time)}"


KIND = Kind("abandoned_cart", Spec, "marketing", due, occurrence, reference="cart")
