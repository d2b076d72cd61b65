"""Onboarding day N: N days after sign-up. Several files (day 0, 3, 7…) make a series."""

from datetime import datetime, timedelta
from typing import Literal

from pydantic import Field
from sqlalchemy import null, select
from sqlmodel import col

from flows.kinds.base import DueQuery, Kind
from flows.spec.common import Duration, Reentry, ReentryRule
from flows.spec.trigger import TriggerBase
from models import Customer


class Spec(TriggerBase):
    kind: Literal["onboarding"]
    day: int = Field(ge=0, le=3650, description="Days after sign-up.")
    catch_up: Duration = Field(
        default=timedelta(days=2), description="How late a missed day may still be sent (after downtime)."
    )
    reentry: ReentryRule = Reentry(mode="once")


def due(spec: Spec, now: datetime) -> DueQuery:
    moment = now - timedelta(days=spec.day)
    created_at = col(Customer.created_at)
    return select(col(Customer.id).label("customer_id"), null().label("ref_id"), created_at.label("ref_time")).where(
        created_at <= moment, created_at > moment - spec.catch_up
    )


def occurrence(spec: Spec, now: datetime, ref_id: int | None, ref_time: datetime | None) -> str:
    return f"day:{spec.day}"


KIND = Kind("onboarding", Spec, "marketing", due, occurrence)
