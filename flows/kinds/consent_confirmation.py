"""Consent confirmation (double opt-in): ask customers who opted in to confirm by link.

Service mail (``transactional``): it goes out before consent exists, carries no
marketing content, and only the signed ``links.confirm`` link turns the request into
consent (recorded with its time and source).
"""

from datetime import datetime, timedelta
from typing import Literal

from pydantic import Field
from sqlalchemy import Select, null, select

from flows.kinds.base import Kind, stamp
from flows.spec.common import Duration, Reentry, ReentryRule, TriggerBase
from models import Customer


class Spec(TriggerBase):
    kind: Literal["consent_confirmation"]
    max_age: Duration = Field(default=timedelta(days=7), description="Older requests are not asked again.")
    reentry: ReentryRule = Reentry(mode="every_occurrence")


def due(spec: Spec, now: datetime) -> Select:
    return select(Customer.id.label("customer_id"), null().label("ref_id"),
                  Customer.consent_requested_at.label("ref_time")).where(
        Customer.marketing_consent.is_(False),
        Customer.consent_requested_at <= now,
        Customer.consent_requested_at > now - spec.max_age,
    )


def occurrence(spec: Spec, now: datetime, ref_id: int | None, ref_time: datetime | None) -> str:
    return f"request:{stamp(ref_time)}"  # a new request (after a withdrawal) asks again


KIND = Kind("consent_confirmation", Spec, "transactional", due, occurrence, reference="consent")
