"""Campaign: everyone in the audience, once per cron slot (e.g. a weekly win-back)."""

from datetime import datetime, timedelta
from typing import Literal

from pydantic import Field
from sqlalchemy import false, null, select
from sqlmodel import col

from flows import clock
from flows.kinds.base import DueQuery, Kind, stamp
from flows.spec.common import Duration, Reentry, ReentryRule
from flows.spec.trigger import TriggerBase
from models import Customer


class Spec(TriggerBase):
    kind: Literal["campaign"]
    send_window: Duration = Field(
        default=timedelta(hours=12),
        description="A run later than this after its slot sends nothing: stale campaigns stay unsent.",
    )
    reentry: ReentryRule = Reentry(mode="every_occurrence")


def slot(spec: Spec, now: datetime) -> datetime:
    return clock.last_slot(spec.schedule.cron, spec.schedule.timezone, now)


def due(spec: Spec, now: datetime) -> DueQuery:
    query: DueQuery = select(col(Customer.id).label("customer_id"), null().label("ref_id"), null().label("ref_time"))
    if now - slot(spec, now) > spec.send_window:
        return query.where(false())
    return query


def occurrence(spec: Spec, now: datetime, ref_id: int | None, ref_time: datetime | None) -> str:
    return f"slot:{stamp(slot(spec, now))}"


KIND = Kind("campaign", Spec, "marketing", due, occurrence)
