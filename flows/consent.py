"""Who may be mailed: marketing consent asked for, confirmed and withdrawn (every change
recorded), and the suppressions no trigger may write to.

Double opt-in: the shop's opt-in is a *request* (``Customer.consent_requested_at``); only
the confirmation link mailed for that request turns it into consent. A confirmation
link confirms exactly one request (``request_id``), once, until the request expires, and
never after the customer has unsubscribed since: then only a new opt-in request can be
confirmed. Each change is written to ``consent_changes`` with its time, its source and the
request it answers, so a confirmation leads back to the mail whose link was used.
"""

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, Engine, Exists, and_, delete, exists, func, or_, select
from sqlmodel import Session, col

from flows.content.links import UNSUBSCRIBE, address_tag, expired, read
from flows.kinds.base import Kind
from flows.kinds.consent_confirmation import request_id
from models import (
    CategoryOptOut,
    ConsentChange,
    ConsentChangeKind,
    Customer,
    Suppression,
    SuppressionReason,
    suppression_key,
)
from models.db import insert_for, one_of, writer
from models.identity import customer_by_id
from models.types import utcnow

__all__ = ["Confirmation", "check", "confirm", "history", "lift", "record", "request_id", "requested_at", "suppress",
           "suppressed_for", "suppressions", "unsubscribe_by_token", "withdraw", "withdrawn"]


def requested_at(request: str) -> datetime:
    """The moment ``request_id`` was made from (UTC)."""
    return datetime.strptime(request.removeprefix("request:"), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)


def record(session: Session, customer: Customer, change: ConsentChangeKind, source: str, *,
           at: datetime, request: str | None = None, detail: str = "") -> None:
    assert customer.id is not None
    session.add(ConsentChange(customer_id=customer.id, at=at, change=change.value, source=source[:64],
                              request=request, detail=detail[:500]))


def withdraw(session: Session, customer: Customer, source: str, *, at: datetime, detail: str = "",
             suppress: bool = True) -> None:
    """Withdraw consent to marketing: consent and any pending request gone, the change
    recorded. An unsubscribe (``suppress``) also suppresses the address, so that other
    records sharing it are not mailed either; the shop's ``marketing_consent: false`` does not."""
    customer.marketing_consent, customer.consent_at, customer.consent_requested_at = False, None, None
    customer.consent_withdrawn_at = at
    session.add(customer)
    if suppress and customer.email and session.get(Suppression, suppression_key(customer.email)) is None:
        session.add(Suppression(email=suppression_key(customer.email), reason=SuppressionReason.UNSUBSCRIBED,
                                detail=f"{source} ({detail})" if detail else source, created_at=at))
    record(session, customer, ConsentChangeKind.WITHDRAWN, source, at=at, detail=detail)


class Confirmation(StrEnum):
    CONFIRMED = "confirmed"
    ALREADY = "already"  # this very link already confirmed (clicked twice): nothing changed
    SPENT = "spent"  # expired, answered, superseded or withdrawn since: nothing changed


def check(session: Session, customer: Customer, token: dict[str, Any], *, at: datetime, secret: str) -> Confirmation:
    """What confirming with this (genuine) token would do, changing nothing. The request
    must be the customer's pending one, made for the address the customer still has: a
    link mailed to another address (before a change of address, or to a record merged in
    since) never confirms this one."""
    request = token.get("r")
    if customer.marketing_consent:  # the same link clicked again is answered, any other refused
        return Confirmation.ALREADY if _last_confirmed(session, customer) == request else Confirmation.SPENT
    pending = customer.consent_requested_at
    if expired(token, at) or not isinstance(request, str) or pending is None or request_id(pending) != request:
        return Confirmation.SPENT
    if not customer.email or token.get("a") != address_tag(secret, customer.email):
        return Confirmation.SPENT
    withdrawn = customer.consent_withdrawn_at
    suppression = session.get(Suppression, suppression_key(customer.email)) if customer.email else None
    if ((withdrawn is not None and withdrawn >= pending)
            or (suppression is not None and suppression.created_at >= pending)):
        return Confirmation.SPENT  # unsubscribed (or bounced, or complained) after asking: the request is void
    return Confirmation.CONFIRMED


def _last_confirmed(session: Session, customer: Customer) -> str | None:
    request: str | None = session.execute(select(col(ConsentChange.request)).where(
        col(ConsentChange.customer_id) == customer.id, col(ConsentChange.change) == ConsentChangeKind.CONFIRMED.value,
    ).order_by(col(ConsentChange.at).desc(), col(ConsentChange.id).desc()).limit(1)).scalar()
    return request


def confirm(session: Session, customer: Customer, token: dict[str, Any], *, at: datetime, secret: str,
            source: str = "double opt-in link") -> Confirmation:
    """Confirm the one request the (genuine) confirmation token names, if it is still pending."""
    outcome = check(session, customer, token, at=at, secret=secret)
    if outcome is not Confirmation.CONFIRMED:
        return outcome
    customer.marketing_consent, customer.consent_at, customer.consent_source = True, at, source
    customer.consent_requested_at, customer.consent_withdrawn_at = None, None
    session.add(customer)
    suppression = session.get(Suppression, suppression_key(customer.email)) if customer.email else None
    if suppression is not None and suppression.reason == SuppressionReason.UNSUBSCRIBED:
        session.delete(suppression)  # a confirmed new opt-in lifts an unsubscribe from before it
    record(session, customer, ConsentChangeKind.CONFIRMED, source, at=at, request=str(token["r"]))
    return outcome


def history(session: Session, customer_id: int) -> list[ConsentChange]:
    """The customer's consent record, oldest first."""
    return list(session.execute(select(ConsentChange).where(col(ConsentChange.customer_id) == customer_id)
                                .order_by(col(ConsentChange.at), col(ConsentChange.id))).scalars())


# -- suppressions ------------------------------------------------------------------

def suppress(engine: Engine, emails: Iterable[str], reason: SuppressionReason, detail: str = "") -> None:
    """Suppress addresses (an address already suppressed keeps its first reason)."""
    rows = [{"email": e, "reason": reason.value, "detail": detail[:1000], "created_at": utcnow()}
            for e in {suppression_key(e) for e in emails}]
    if not rows:
        return
    with engine.begin() as connection:
        connection.execute(insert_for(engine)(Suppression).values(rows).on_conflict_do_nothing(index_elements=["email"]))


def lift(engine: Engine, emails: Iterable[str]) -> int:
    """Lift suppressions; returns how many there were (marketing still needs confirmed consent)."""
    with engine.begin() as connection:
        removed = connection.execute(delete(Suppression).where(
            col(Suppression.email).in_([suppression_key(e) for e in emails])))
    return int(removed.rowcount)


def suppressions(engine: Engine, reason: str | None = None, limit: int = 100) -> list[Suppression]:
    """Suppressed addresses, newest first."""
    query = select(Suppression).order_by(col(Suppression.created_at).desc()).limit(limit)
    if reason:
        query = query.where(col(Suppression.reason) == reason)
    with Session(engine) as session:
        return list(session.execute(query).scalars().all())


def unsubscribe_by_token(engine: Engine, secret: str, token: str, via: str, at: datetime) -> Customer | None:
    """Unsubscribe the customer a genuine unsubscribe token names; None for a forged one.
    Unsubscribe tokens never expire (``flows.content.links``)."""
    data = read(secret, UNSUBSCRIBE, token)
    if data is None:
        return None
    with Session(writer(engine), expire_on_commit=False) as session:
        customer = customer_by_id(session, data["c"], lock=True)
        if customer is None or not customer.email:
            return None
        withdraw(session, customer, via, at=at, detail=str(data.get("k")))
        session.commit()
        return customer


# -- in the audience ---------------------------------------------------------------

def suppressed_for(kind: Kind) -> Exists:
    """Marketing stops for any suppression; service mail only for undeliverable or complaining addresses."""
    condition = col(Suppression.email) == func.lower(Customer.email)
    if kind.category == "transactional":
        condition = and_(condition, col(Suppression.reason) != SuppressionReason.UNSUBSCRIBED)
    return exists().where(condition)


def withdrawn(engine: Engine, kind: Kind, customer_ids: Sequence[int]) -> set[int]:
    """Customers who, since the audience was read, unsubscribed, left this category or were
    suppressed: checked again right before each batch is sent, so it takes effect at once."""
    if not customer_ids:
        return set()
    blocked: ColumnElement[bool] = suppressed_for(kind)
    if kind.category == "marketing":
        opted_out = exists().where(col(CategoryOptOut.customer_id) == col(Customer.id),
                                   col(CategoryOptOut.category) == kind.name)
        blocked = or_(blocked, col(Customer.marketing_consent).is_(False), opted_out)
    with engine.connect() as connection:
        among = one_of(Customer.id, customer_ids, engine.dialect.name)
        return {customer_id for customer_id in connection.execute(select(col(Customer.id)).where(among, blocked))
                .scalars() if customer_id is not None}
