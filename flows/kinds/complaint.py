"""Complaint received: acknowledge every complaint that is not yet answered.

This is service mail (``transactional``): it needs no marketing consent, but
suppressed addresses (bounces, spam complaints, unsubscribes) are still honoured.
"""

from datetime import datetime, timedelta
from typing import Literal

from pydantic import Field
from sqlalchemy import Select, or_, select

from flows.kinds.base import Kind
from flows.spec.common import Duration, Reentry, ReentryRule, TriggerBase
from models import Complaint


class Spec(TriggerBase):
    kind: Literal["complaint"]
    max_age: Duration = Field(default=timedelta(days=7), description="Older complaints are not acknowledged.")
    reentry: ReentryRule = Reentry(mode="every_occurrence")


def due(spec: Spec, now: datetime) -> Select:
    return select(
        Complaint.customer_id, Complaint.id.label("ref_id"), Complaint.received_at.label("ref_time")
    ).where(
        Complaint.received_at <= now,
        Complaint.received_at > now - spec.max_age,
        or_(Complaint.answered_at.is_(None), Complaint.answered_at > now),
    )


def occurrence(spec: Spec, now: datetime, ref_id: int | None, ref_time: datetime | None) -> str:
    return f"complaint:{ref_id}"


KIND = Kind("complaint", Spec, "transactional", due, occurrence, reference="complaint")
