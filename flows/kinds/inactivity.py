"""Inactivity: no tracked activity (or, for never-seen customers, no sign-up) for a while."""

from datetime import datetime, timedelta
from typing import Literal

from pydantic import model_validator
from sqlalchemy import func, null, select
from sqlmodel import col

from flows.kinds.base import DueQuery, Kind, stamp
from flows.spec.common import Duration, Reentry, ReentryRule
from flows.spec.trigger import TriggerBase
from models import Customer


class Spec(TriggerBase):
    kind: Literal["inactivity"]
    inactive_for: Duration
    give_up_after: Duration | None = None
    reentry: ReentryRule = Reentry(mode="cooldown", cooldown=timedelta(days=30))

    @model_validator(mode="after")
    def _window(self) -> "Spec":
        if self.give_up_after is not None and self.give_up_after <= self.inactive_for:
            raise ValueError("give_up_after must be longer than inactive_for")
        return self


def due(spec: Spec, now: datetime) -> DueQuery:
    last_active = func.coalesce(Customer.last_seen_at, Customer.created_at)
    query: DueQuery = select(
        col(Customer.id).label("customer_id"), null().label("ref_id"), last_active.label("ref_time")
    ).where(last_active <= now - spec.inactive_for)
    if spec.give_up_after is not None:
        query = query.where(last_active > now - spec.give_up_after)
    return query


def occurrence(spec: Spec, now: datetime, ref_id: int | None, ref_time: datetime | None) -> str:
    # One occurrence per quiet spell: activity starts a new spell, and with it a new key.
    return f"quiet-since:{stamp(ref_time)}"


KIND = Kind("inactivity", Spec, "marketing", due, occurrence)
