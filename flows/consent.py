"""Marketing consent: asked for, confirmed, withdrawn, and every change recorded.

Double opt-in: the shop's opt-in is a *request* (``Customer.consent_requested_at``); only
the confirmation link mailed for that request turns it into consent. A confirmation
link confirms exactly one request (``request_id``), once, until the request expires, and
never after the customer has unsubscribed since: then only a new opt-in request can be
confirmed. Each change is written to ``consent_changes`` with its time, its source and the
request it answers, so a confirmation leads back to the mail whose link was used.
"""

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import select
from sqlmodel import Session

from flows.kinds.consent_confirmation import request_id
from flows.content.links import address_tag, expired
from models import (
    ConsentChange,
    ConsentChangeKind,
    Customer,
    Suppression,
    SuppressionReason,
    suppression_key,
)

__all__ = ["Confirmation", "check", "confirm", "history", "record", "request_id", "requested_at", "withdraw"]


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
    if (withdrawn is not None and withdrawn >= pending) or (suppression is not None and suppression.created_at >= pending):
        return Confirmation.SPENT  # unsubscribed (or bounced, or complained) after asking: the request is void
    return Confirmation.CONFIRMED


def _last_confirmed(session: Session, customer: Customer) -> str | None:
    return session.execute(select(ConsentChange.request).where(
        ConsentChange.customer_id == customer.id, ConsentChange.change == ConsentChangeKind.CONFIRMED.value,
    ).order_by(ConsentChange.at.desc(), ConsentChange.id.desc()).limit(1)).scalar()


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
    return list(session.execute(select(ConsentChange).where(ConsentChange.customer_id == customer_id)
                                .order_by(ConsentChange.at, ConsentChange.id)).scalars())
