"""After a purchase: a while after an order event, such as "Order Delivered", one occurrence per event.

The shop tells us of the order's progress by events (``lifecycle ingest``, the tracking
API): each such event is one occurrence, so a customer with two deliveries is due twice,
and the trigger's re-entry says whether both are mailed.
"""

from datetime import datetime, timedelta
from typing import Literal

from pydantic import Field
from sqlalchemy import select
from sqlmodel import col

from flows.kinds.base import DueQuery, Kind
from flows.spec.common import Duration, Reentry, ReentryRule
from flows.spec.trigger import TriggerBase
from models import Customer, Event


class Spec(TriggerBase):
    kind: Literal["post_purchase"]
    event: str = Field(default="Order Delivered", min_length=1, max_length=255,
                       description="The track event that starts the wait, e.g. Order Delivered or Order Completed.")
    after: Duration = Field(description="How long after the event the customer is due, e.g. 10d.")
    catch_up: Duration = Field(
        default=timedelta(days=2), description="How late a missed occurrence may still be sent (after downtime).")
    reentry: ReentryRule = Reentry(mode="every_occurrence")


def due(spec: Spec, now: datetime) -> DueQuery:
    moment = now - spec.after
    # The events table is the largest in the store: its timestamp index bounds the scan to the
    # catch-up window, and the customer is found by the event's user id.
    return (select(col(Customer.id).label("customer_id"), col(Event.id).label("ref_id"),
                   col(Event.timestamp).label("ref_time"))
            .select_from(Event).join(Customer, col(Customer.external_id) == col(Event.user_id))
            .where(col(Event.type) == "track", col(Event.name) == spec.event, col(Event.timestamp) <= moment,
                   col(Event.timestamp) > moment - spec.catch_up))


def occurrence(spec: Spec, now: datetime, ref_id: int | None, ref_time: datetime | None) -> str:
    # The stored event's id: the same delivery is one occurrence however often the run sees it.
    return f"event:{ref_id}"


KIND = Kind("post_purchase", Spec, "marketing", due, occurrence)
