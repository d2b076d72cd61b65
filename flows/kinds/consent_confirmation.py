"""Consent confirmation (double opt-in): ask customers who opted in to confirm by link.

Service mail (``transactional``): it goes out before consent exists, carries no
marketing content, and only the signed ``links.confirm`` link turns the request into
consent (recorded with its time and source).
"""

from datetime import datetime, timedelta
from typing import Literal

from pydantic import Field
from sqlalchemy import null, or_, select
from sqlmodel import col

from flows.kinds.base import DueQuery, Kind, stamp
from flows.spec.common import Duration, Reentry, ReentryRule
from flows.spec.trigger import TriggerBase
from models import Customer


class Spec(TriggerBase):
    service = True
    kind: Literal["consent_confirmation"]
    max_age: Duration = Field(default=timedelta(days=7), description="Older requests are not asked again.")
    reentry: ReentryRule = Reentry(mode="every_occurrence")


def due(spec: Spec, now: datetime) -> DueQuery:
    requested_at = col(Customer.consent_requested_at)
    return select(col(Customer.id).label("customer_id"), null().label("ref_id"), requested_at.label("ref_time")).where(
        col(Customer.marketing_consent).is_(False),
        requested_at <= now,
        requested_at > now - spec.max_age,
        # A request from before the customer's last withdrawal is void (``flows.consent.confirm``).
        or_(col(Customer.consent_withdrawn_at).is_(None), requested_at > Customer.consent_withdrawn_at),
    )


def request_id(requested_at: datetime) -> str:
    """A consent request's id: its confirmation mail's occurrence, and what its link confirms."""
    return f"request:{stamp(requested_at)}"


def occurrence(spec: Spec, now: datetime, ref_id: int | None, ref_time: datetime | None) -> str:
    assert ref_time is not None
    return request_id(ref_time)  # a new request (after a withdrawal) asks again


KIND = Kind("consent_confirmation", Spec, "transactional", due, occurrence, reference="consent")
