"""Who is due: one set-based query per trigger, streamed in batches, with skip reasons.

The query joins the kind's due occurrences to customers, their stage, suppressions
and the trigger's send history, so each row arrives with everything needed to decide
"send" or "skip, because …" without another query per customer.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum

from sqlalchemy import Engine, and_, exists, false, func, or_, select
from sqlmodel import Session

from flows.kinds.base import Kind
from flows.render import language_of
from flows.spec.common import TriggerBase
from flows.spec.stages import StageRules
from flows.stages import order_stats, stage_expression
from models import CategoryOptOut, Customer, Send, SendStatus, Suppression, SuppressionReason


class Skip(StrEnum):
    NO_EMAIL = "no_email"
    SUPPRESSED = "suppressed"
    NO_CONSENT = "no_consent"
    CONSENT_PENDING = "consent_pending"  # asked, not yet confirmed (double opt-in)
    OPTED_OUT = "opted_out"  # left this category on the preference page
    REENTRY = "reentry"
    ALREADY_SENT = "already_sent"
    UNSUBSCRIBED = "unsubscribed_during_run"  # checked again just before sending


@dataclass(frozen=True, slots=True)
class Candidate:
    customer_id: int
    external_id: str
    email: str | None
    first_name: str | None
    last_name: str | None
    locale: str
    language: str
    stage: str
    ref_id: int | None
    occurrence: str
    send_key: str
    skip: Skip | None = None


def send_key(trigger: str, customer_id: int, occurrence: str) -> str:
    return f"{trigger}/{customer_id}/{occurrence}"


def audience_query(trigger: TriggerBase, kind: Kind, rules: StageRules, now: datetime):
    due = kind.due(trigger, now).subquery("due")
    stats = order_stats(now).subquery("stats")
    stage = stage_expression(rules, stats, now)
    suppressed = suppressed_for(kind)
    opted_out = exists().where(CategoryOptOut.customer_id == Customer.id, CategoryOptOut.category == kind.name)
    reentry = _reentry_blocked(trigger, now)
    audience = trigger.audience
    orders = func.coalesce(stats.c.order_count, 0)
    value = func.coalesce(stats.c.total_cents, 0)

    query = (
        select(
            Customer.id,
            Customer.external_id,
            Customer.email,
            Customer.first_name,
            Customer.last_name,
            Customer.locale,
            Customer.marketing_consent,
            Customer.consent_requested_at,
            due.c.ref_id,
            due.c.ref_time,
            stage.label("stage"),
            suppressed.label("suppressed"),
            opted_out.label("opted_out"),
            reentry.label("reentry_blocked"),
        )
        .select_from(due)
        .join(Customer, Customer.id == due.c.customer_id)
        .outerjoin(stats, stats.c.customer_id == Customer.id)
    )
    if audience.stages:
        query = query.where(stage.in_(audience.stages))
    if audience.locales:
        query = query.where(func.lower(func.substr(Customer.locale, 1, 2)).in_(audience.locales))
    if audience.min_orders is not None:
        query = query.where(orders >= audience.min_orders)
    if audience.max_orders is not None:
        query = query.where(orders <= audience.max_orders)
    if audience.min_lifetime_value is not None:
        query = query.where(value >= round(audience.min_lifetime_value * 100))
    if audience.max_lifetime_value is not None:
        query = query.where(value <= round(audience.max_lifetime_value * 100))
    return query.order_by(Customer.id, due.c.ref_id)


def suppressed_for(kind: Kind):
    """Marketing stops for any suppression; service mail only for undeliverable or complaining addresses."""
    condition = Suppression.email == func.lower(Customer.email)
    if kind.category == "transactional":
        condition = and_(condition, Suppression.reason != SuppressionReason.UNSUBSCRIBED)
    return exists().where(condition)


def withdrawn(engine: Engine, kind: Kind, customer_ids: Sequence[int]) -> set[int]:
    """Customers who, since the audience was read, unsubscribed, left this category or were
    suppressed: checked again right before each batch is sent, so it takes effect at once."""
    if not customer_ids:
        return set()
    blocked = suppressed_for(kind)
    if kind.category == "marketing":
        opted_out = exists().where(CategoryOptOut.customer_id == Customer.id, CategoryOptOut.category == kind.name)
        blocked = or_(blocked, Customer.marketing_consent.is_(False), opted_out)
    with engine.connect() as connection:
        return set(connection.execute(select(Customer.id).where(Customer.id.in_(customer_ids), blocked)).scalars())


def _reentry_blocked(trigger: TriggerBase, now: datetime):
    """True when an earlier send of this trigger to the customer forbids another now."""
    rule = trigger.reentry
    if rule.mode == "every_occurrence":
        return false()
    earlier = and_(
        Send.trigger == trigger.name,
        Send.customer_id == Customer.id,
        Send.status.in_([SendStatus.SENDING, SendStatus.SENT]),
    )
    if rule.mode == "cooldown":
        earlier = and_(earlier, Send.evaluated_at > now - rule.cooldown, Send.evaluated_at <= now)
    return exists().where(earlier)


def stream_candidates(
    engine: Engine,
    trigger: TriggerBase,
    kind: Kind,
    rules: StageRules,
    now: datetime,
    batch_size: int,
    default_language: str,
) -> Iterator[list[Candidate]]:
    """Batches of candidates, each already classified (``skip`` set or ``None`` for due)."""
    query = audience_query(trigger, kind, rules, now).execution_options(yield_per=batch_size)
    with Session(engine) as reader, Session(engine) as ledger:
        for rows in reader.execute(query).partitions(batch_size):
            batch = [_candidate(row, trigger, kind, now, default_language) for row in rows]
            yield _mark_already_sent(ledger, batch)


def _candidate(row, trigger: TriggerBase, kind: Kind, now: datetime, default_language: str) -> Candidate:
    occurrence = kind.occurrence(trigger, now, row.ref_id, row.ref_time)
    skip = None
    if not row.email:
        skip = Skip.NO_EMAIL
    elif row.suppressed:
        skip = Skip.SUPPRESSED
    elif kind.category == "marketing" and not row.marketing_consent:
        skip = Skip.CONSENT_PENDING if row.consent_requested_at else Skip.NO_CONSENT
    elif kind.category == "marketing" and row.opted_out:
        skip = Skip.OPTED_OUT
    elif row.reentry_blocked:
        skip = Skip.REENTRY
    return Candidate(
        customer_id=row.id,
        external_id=row.external_id,
        email=row.email,
        first_name=row.first_name,
        last_name=row.last_name,
        locale=row.locale or default_language,
        language=language_of(row.locale, default_language),
        stage=row.stage,
        ref_id=row.ref_id,
        occurrence=occurrence,
        send_key=send_key(trigger.name, row.id, occurrence),
        skip=skip,
    )


def _mark_already_sent(session: Session, batch: list[Candidate]) -> list[Candidate]:
    """One lookup per batch; the claim at dispatch remains the real guard."""
    keys = [c.send_key for c in batch]
    if not keys:
        return batch
    done = set(session.execute(select(Send.send_key).where(Send.send_key.in_(keys))).scalars())
    session.rollback()  # end the read transaction so SQLite can checkpoint
    if not done:
        return batch
    return [
        replace(c, skip=Skip.ALREADY_SENT) if c.send_key in done and c.skip in (None, Skip.REENTRY) else c
        for c in batch
    ]
