"""Onboarding day N: N days after sign-up. Several files (day 0, 3, 7…) make a series."""

from datetime import datetime, timedelta
from typing import Literal

from pydantic import Field
from sqlalchemy import Select, null, select

from flows.kinds.base import Kind
from flows.spec.common import Duration, Reentry, ReentryRule, TriggerBase
from models import Customer


class Spec(TriggerBase):
    kind: Literal["onboarding"]
    day: int = Field(ge=0, le=3650, description="Days after sign-up.")
    catch_up: Duration = Field(
        default=timedelta(days=2), description="How late a missed day may still be sent (after downtime)."
    )
    reentry: ReentryRule = Reentry(mode="once")


def due(spec: Spec, now: datetime) -> Select:
    moment = now - timedelta(days=spec.day)
    return select(Customer.id.label("customer_id"), null().label("ref_id"), Customer.created_at.label("ref_time")).where(
        Customer.created_at <= moment, Customer.created_at > moment - spec.catch_up
    )


def occurrence(spec: Spec, now: datetime, ref_id: int | None, ref_time: datetime | None) -> str:
    return f"day:{spec.day}"


KIND = Kind("onboarding", Spec, "marketing", due, occurrence)
