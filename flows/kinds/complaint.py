"""Complaint received: acknowledge every complaint that is not yet answered.

This is service mail (``transactional``): it needs no marketing consent, but
suppressed addresses (bounces, spam complaints, unsubscribes) are still honoured.
"""

from datetime import datetime, timedelta
from typing import Literal

from pydantic import Field
from sqlalchemy import or_, select
from sqlmodel import col

from flows.kinds.base import DueQuery, Kind
from flows.spec.common import Duration, Reentry, ReentryRule
from flows.spec.trigger import TriggerBase
from models import Complaint


class Spec(TriggerBase):
    service = True
    kind: Literal["complaint"]
    max_age: Duration = Field(default=timedelta(days=7), description="Older complaints are not acknowledged.")
    reentry: ReentryRule = Reentry(mode="every_occurrence")


def due(spec: Spec, now: datetime) -> DueQuery:
    return select(
        col(Complaint.customer_id), col(Complaint.id).label("ref_id"), col(Complaint.received_at).label("ref_time")
    ).where(
        col(Complaint.received_at) <= now,
        col(Complaint.received_at) > now - spec.max_age,
        or_(col(Complaint.answered_at).is_(None), col(Complaint.answered_at) > now),
    )


def occurrence(spec: Spec, now: datetime, ref_id: int | None, ref_time: datetime | None) -> str:
    return f"complaint:{ref_id}"


KIND = Kind("complaint", Spec, "transactional", due, occurrence, reference="complaint")
