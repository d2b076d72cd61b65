"""The right to erasure: ``forget`` a customer, in one transaction, all or nothing.

What goes and what stays is decided per table (docs/privacy.md says why, at length):

- **Deleted**: clicks and opens (``engagements``), carts and their items, category
  opt-outs, group memberships.
- **Anonymised**, the row kept for the counts it is part of: the customer row (no
  address, names, time zone or language; consent withdrawn; ``forgotten_at`` set), the
  ledger (``sends``: a per-row placeholder address, no links, no SMTP reply, identifiers
  taken out of the error text; trigger, status, stage, template and times stay, so every
  count of the ledger is the same afterwards), orders (total, currency and time stay;
  products and the shop's order number go), complaints (no subject), the consent record
  (no detail), bounce and complaint reports (no address, no diagnostic), and the event
  log (each event kept as a tombstone: its messageId, type and time, so that replaying an
  old export is recognised as a duplicate and cannot bring the person back).
- **Kept**: attributions (counts and money, naming no one), and the suppression of the
  address, in clear text: a do-not-contact list is what keeps the erased address from
  being mailed again, and the lookups that enforce it compare addresses.

The shop's id becomes a keyed, one-way ``marker``, so that forgetting the same id again
is recognised (``already``) and changes nothing, while a new event from the shop with
that id makes a new, empty profile.
"""

import hashlib
import hmac
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    String,
    and_,
    bindparam,
    case,
    cast,
    delete,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlmodel import Session, col

from models import (
    Cart,
    CartItem,
    CategoryOptOut,
    Complaint,
    ConsentChange,
    ConsentChangeKind,
    Customer,
    CustomerAlias,
    Engagement,
    Event,
    Feedback,
    GroupMembership,
    Order,
    Send,
    Suppression,
    SuppressionReason,
    suppression_key,
)
from models.db import writer
from models.identity import customer_by_id
from models.types import display_address

__all__ = ["ERASED", "ERASURE_SOURCE", "AddressSuppression", "Forgotten", "forget", "forgotten_at", "marker",
           "placeholder_address"]

MARKER = "forgotten:"
ERASED = "[forgotten]"  # what stands where an identifier was taken out of a text
ERASURE_SOURCE = "erasure"  # the consent record's source for the withdrawal an erasure is
_DEFAULT_LOCALE = str(Customer.model_fields["locale"].default)  # "en": the column's "never said"


def marker(secret: str, external_id: str) -> str:
    """The stand-in for a forgotten shop id: keyed (HMAC-SHA256 with the signing secret),
    so that ids counted 1, 2, 3… cannot be found again by hashing each candidate; 96 bits,
    so that two ids never share one."""
    digest = hmac.new(secret.encode(), external_id.encode(), hashlib.sha256).hexdigest()
    return MARKER + digest[:24]


def placeholder_address(send_id: int) -> str:
    """A forgotten send's address: one per row, so the ledger's unique index (address,
    trigger, occurrence) holds, and in ``.invalid`` (RFC 2606), which no mail can reach."""
    return f"forgotten-{send_id}@invalid"


def is_placeholder(address: str) -> bool:
    """An address ``forget`` put in place of a real one: nothing about it is worth keeping."""
    return address.startswith("forgotten-") and address.endswith("@invalid")


def _placeholder_sql() -> Any:
    return literal("forgotten-") + cast(col(Send.id), String) + literal("@invalid")


class AddressSuppression(StrEnum):
    """What became of the customer's address on the suppression list."""

    ADDED = "added"  # it was not suppressed: it is now (as an unsubscribe, which a new confirmed opt-in lifts)
    KEPT = "kept"  # it was suppressed already (unsubscribe, bounce, complaint): it stays so
    SHARED = "shared"  # another customer record has the address: their consent decides, nothing added
    NONE = "none"  # no address (or nothing was done)


@dataclass(frozen=True)
class Forgotten:
    """What ``forget`` did. ``found`` False: no customer has the id, and none had it (nothing
    changed). ``already``: the id was forgotten before (nothing changed). ``deleted`` and
    ``anonymised``: rows per table."""

    found: bool
    already: bool = False
    marker: str = ""
    deleted: dict[str, int] = field(default_factory=dict)
    anonymised: dict[str, int] = field(default_factory=dict)
    suppression: AddressSuppression = AddressSuppression.NONE

    @property
    def changed(self) -> bool:
        return self.found and not self.already

    def to_json(self) -> dict[str, Any]:
        """For ``lifecycle forget --format json`` and an audit trail: no id, only what was done."""
        return {"found": self.found, "already": self.already, "marker": self.marker, "deleted": self.deleted,
                "anonymised": self.anonymised, "suppression": self.suppression.value}

    def summary(self, external_id: str) -> str:
        """One sentence for a person (the operator who ran the erasure)."""
        if not self.found:
            return f"No customer is known as {external_id!r}, nor was one forgotten under it: nothing changed."
        if self.already:
            return f"{external_id!r} was forgotten before: nothing changed."
        deleted = ", ".join(f"{n} {table}" for table, n in self.deleted.items() if n) or "nothing"
        anonymised = ", ".join(f"{n} {table}" for table, n in self.anonymised.items() if n) or "nothing"
        address = {AddressSuppression.ADDED: "the address is now suppressed, so it is never mailed again",
                   AddressSuppression.KEPT: "the address stays suppressed, as it was",
                   AddressSuppression.SHARED: "the address belongs to another customer record too: not suppressed",
                   AddressSuppression.NONE: "there was no address"}[self.suppression]
        return (f"Forgot {external_id!r} (now {self.marker}): deleted {deleted}; anonymised {anonymised}; "
                f"{address}.")


def forget(engine: Engine, customer_external_id: str, *, secret: str, at: datetime) -> Forgotten:
    """Erase the customer the shop id (or any of their aliases) names: everything of theirs
    in one transaction, so a failure half-way leaves the store as it was.

    ``secret``: the signing secret (``flows.signing_secret.resolved(...).signing_secret``);
    the marker is keyed with it, so another secret does not recognise an earlier erasure.
    ``at``: the moment recorded as ``forgotten_at`` (and on the consent record)."""
    stand_in = marker(secret, customer_external_id)
    with Session(writer(engine)) as session:
        customer = customer_by_id(session, customer_external_id, lock=True)
        if customer is None or customer.forgotten_at is not None:
            earlier = customer or customer_by_id(session, stand_in)
            known = earlier is not None and earlier.forgotten_at is not None
            return Forgotten(found=known, already=known, marker=earlier.external_id if earlier and known else "")
        forgotten = _Erasure(session.connection(), customer, secret, at).run()
        session.commit()
    return forgotten


def forgotten_at(engine: Engine, customer_external_id: str, *, secret: str) -> datetime | None:
    """When a customer this shop id (or alias) named was first forgotten; None if none was.
    For surfaces that meet an old id (``lifecycle customer``, an old unsubscribe link)."""
    with Session(engine) as session:
        customer = customer_by_id(session, customer_external_id)  # the marker itself names it too
        if customer is None or customer.forgotten_at is None:
            customer = customer_by_id(session, marker(secret, customer_external_id))
        return customer.forgotten_at if customer is not None else None


def _scrubber(identifiers: Iterable[str]) -> Callable[[str], str]:
    """Replaces each identifier (case-insensitively, as a whole word) with ``ERASED``."""
    words = sorted({word for word in identifiers if len(word) >= 2}, key=len, reverse=True)
    if not words:
        return lambda text: text
    pattern = re.compile("|".join(rf"(?<!\w){re.escape(word)}(?!\w)" for word in words), re.IGNORECASE)
    return lambda text: pattern.sub(ERASED, text) if text else text


class _Erasure:
    """One customer's erasure, table by table, on one connection (one transaction)."""

    def __init__(self, connection: Connection, customer: Customer, secret: str, at: datetime) -> None:
        assert customer.id is not None
        self.connection, self.customer, self.secret, self.at = connection, customer, secret, at
        self.id: int = customer.id
        self.deleted: dict[str, int] = {}
        self.anonymised: dict[str, int] = {}
        self.aliases: list[str] = list(connection.execute(
            select(col(CustomerAlias.external_id)).where(col(CustomerAlias.customer_id) == self.id)).scalars())
        self.sends = connection.execute(select(col(Send.id), col(Send.send_key), col(Send.email), col(Send.error))
                                        .where(col(Send.customer_id) == self.id).order_by(col(Send.id))).all()
        addresses = {suppression_key(customer.email)} if customer.email else set()
        addresses |= {suppression_key(row.email) for row in self.sends}
        self.addresses = addresses
        # Addresses another (live) customer record has: theirs as much as this one's.
        self.shared: set[str] = set(connection.execute(
            select(func.lower(Customer.email)).where(col(Customer.id) != self.id,
                                                     func.lower(Customer.email).in_(sorted(addresses))))
            .scalars()) if addresses else set()
        names = [name for name in (customer.first_name, customer.last_name) if name]
        forms = {form for address in addresses for form in (address, display_address(address))}
        locals_ = {address.rpartition("@")[0] for address in addresses}
        self.scrub = _scrubber([customer.external_id, *self.aliases, *forms,
                                *(part for part in locals_ if len(part) >= 3), *names])
        self.marker = self._free_customer_marker()

    def run(self) -> Forgotten:
        self.events()
        self.engagements()
        self.carts()
        self.complaints()
        self.orders()
        self.consent_record()
        self.preferences_and_groups()
        self.feedback()
        self.ledger()
        suppression = self.suppressions()
        self.aliases_()
        self.customer_row()
        return Forgotten(found=True, already=False, marker=self.marker, deleted=self.deleted,
                         anonymised=self.anonymised, suppression=suppression)

    def _count(self, into: dict[str, int], table: str, rowcount: int | None) -> None:
        into[table] = into.get(table, 0) + int(rowcount or 0)

    def _free_customer_marker(self) -> str:
        """The marker, or (when an earlier profile with the same shop id was forgotten
        already) the marker with this row's id: unique, and the first still recognised."""
        base = marker(self.secret, self.customer.external_id)
        taken = self.connection.execute(select(col(Customer.id)).where(col(Customer.external_id) == base)).first()
        return base if taken is None else f"{base}/{self.id}"

    # -- the steps, in an order the foreign keys allow ------------------------------------
    def events(self) -> None:
        """Tombstones: messageId (so a replayed export is a duplicate), type and time stay;
        the payload, the id and a page's or screen's name go. A track event's name is the
        shop's vocabulary ("Order Completed"), not the person's."""
        ids = [self.customer.external_id, *self.aliases]
        result = self.connection.execute(
            update(Event).where(col(Event.user_id).in_(ids)).values(
                user_id=self.marker, payload={},
                name=case((col(Event.type) == "track", col(Event.name)), else_=None)))
        self._count(self.anonymised, "events", result.rowcount)

    def engagements(self) -> None:
        """Clicks and opens are behaviour, and worth nothing once the person is gone: deleted.
        (Attributions already made from them stay; a rebuild would find no click.)"""
        theirs = select(col(Send.id)).where(col(Send.customer_id) == self.id)
        # Two statements, each served by its index (an OR of the two would scan the table).
        for condition in (col(Engagement.customer_id) == self.id, col(Engagement.send_id).in_(theirs)):
            result = self.connection.execute(delete(Engagement).where(condition))
            self._count(self.deleted, "engagements", result.rowcount)

    def carts(self) -> None:
        theirs = select(col(Cart.id)).where(col(Cart.customer_id) == self.id)
        items = self.connection.execute(delete(CartItem).where(col(CartItem.cart_id).in_(theirs)))
        self._count(self.deleted, "cart_items", items.rowcount)
        carts = self.connection.execute(delete(Cart).where(col(Cart.customer_id) == self.id))
        self._count(self.deleted, "carts", carts.rowcount)

    def complaints(self) -> None:
        """The complaint stays (received, answered: service figures); its subject and the
        shop's ticket number, which leads back to the person in the help desk, go."""
        result = self.connection.execute(update(Complaint).where(col(Complaint.customer_id) == self.id).values(
            subject="", external_id=literal(MARKER + "complaint-") + cast(col(Complaint.id), String)))
        self._count(self.anonymised, "complaints", result.rowcount)

    def orders(self) -> None:
        """Revenue counts: total, currency and time stay. The products go (an engraving, a
        size, a prescription lens say who someone is), and so does the shop's order number."""
        result = self.connection.execute(update(Order).where(col(Order.customer_id) == self.id).values(
            products=[], external_id=literal(MARKER + "order-") + cast(col(Order.id), String)))
        self._count(self.anonymised, "orders", result.rowcount)

    def consent_record(self) -> None:
        """Each change keeps its kind, time and request (what was consented to, and when);
        its detail goes, and its source loses any identifier. The erasure itself is recorded
        as the withdrawal it is, when there was consent (or a request) to withdraw."""
        rows = self.connection.execute(select(col(ConsentChange.id), col(ConsentChange.source))
                                       .where(col(ConsentChange.customer_id) == self.id)).all()
        if rows:
            self.connection.execute(
                update(ConsentChange).where(col(ConsentChange.id) == bindparam("b_id"))
                .values(detail="", source=bindparam("b_source")),
                [{"b_id": row.id, "b_source": self.scrub(row.source)} for row in rows])
        self._count(self.anonymised, "consent_changes", len(rows))
        if self.customer.marketing_consent or self.customer.consent_requested_at is not None:
            self.connection.execute(insert(ConsentChange).values(
                customer_id=self.id, at=self.at, change=ConsentChangeKind.WITHDRAWN.value, source=ERASURE_SOURCE,
                request=None, detail=""))

    def preferences_and_groups(self) -> None:
        opt_outs = self.connection.execute(delete(CategoryOptOut).where(col(CategoryOptOut.customer_id) == self.id))
        self._count(self.deleted, "category_opt_outs", opt_outs.rowcount)
        groups = self.connection.execute(delete(GroupMembership).where(col(GroupMembership.customer_id) == self.id))
        self._count(self.deleted, "customer_groups", groups.rowcount)

    def feedback(self) -> None:
        """Reports about their sends, and reports that matched no send but name an address of
        theirs nobody else has: kind, status, source and times stay (complaint and bounce
        rates); the address becomes the send's placeholder, the diagnostic (another server's
        words, which name the recipient in any form) goes."""
        by_key = {row.send_key: row.id for row in self.sends}
        private = sorted(self.addresses - self.shared)
        theirs = select(col(Send.send_key)).where(col(Send.customer_id) == self.id)
        matches: list[ColumnElement[bool]] = [col(Feedback.send_key).in_(theirs)]
        if private:
            matches.append(and_(col(Feedback.send_key).is_(None), func.lower(Feedback.email).in_(private)))
        found = {row.id: row for match in matches  # one indexed query each, as for the clicks
                 for row in self.connection.execute(select(col(Feedback.id), col(Feedback.send_key)).where(match))}
        rows = list(found.values())
        if rows:
            self.connection.execute(
                update(Feedback).where(col(Feedback.id) == bindparam("b_id"))
                .values(email=bindparam("b_email"), diagnostic=""),
                [{"b_id": row.id, "b_email": placeholder_address(by_key[row.send_key]) if row.send_key in by_key
                  else f"forgotten-feedback-{row.id}@invalid"} for row in rows])
        self._count(self.anonymised, "feedback", len(rows))

    def ledger(self) -> None:
        """Every row stays with its trigger, status, stage, template and times: the ledger's
        counts are the same afterwards. The address becomes a placeholder, the tracked links
        go (a click on an old mail finds no destination), the SMTP reply goes (its queue id
        leads to the relay's log, which names the recipient), the error loses identifiers."""
        result = self.connection.execute(update(Send).where(col(Send.customer_id) == self.id).values(
            email=_placeholder_sql(), links=None, smtp_reply=""))
        self._count(self.anonymised, "sends", result.rowcount)
        changed = [{"b_id": row.id, "b_error": clean} for row in self.sends
                   if row.error and (clean := self.scrub(row.error)) != row.error]
        if changed:
            self.connection.execute(update(Send).where(col(Send.id) == bindparam("b_id"))
                                    .values(error=bindparam("b_error")), changed)

    def suppressions(self) -> AddressSuppression:
        """Suppressions of any address of theirs stay, in clear text (a do-not-contact list:
        the lookups compare addresses, and a keyed hash would not stop the next import of
        the address); their detail loses identifiers. The current address, if not
        suppressed yet and no other record has it, is suppressed as an unsubscribe."""
        if not self.addresses:
            return AddressSuppression.NONE
        rows = self.connection.execute(select(col(Suppression.email), col(Suppression.detail))
                                       .where(col(Suppression.email).in_(sorted(self.addresses)))).all()
        changed = [{"b_email": row.email, "b_detail": clean} for row in rows
                   if (clean := self.scrub(row.detail)) != row.detail]
        if changed:
            self.connection.execute(update(Suppression).where(col(Suppression.email) == bindparam("b_email"))
                                    .values(detail=bindparam("b_detail")), changed)
        self._count(self.anonymised, "suppressions", len(changed))
        if not self.customer.email:
            return AddressSuppression.NONE
        address = suppression_key(self.customer.email)
        if any(row.email == address for row in rows):
            return AddressSuppression.KEPT
        if address in self.shared:
            return AddressSuppression.SHARED
        self.connection.execute(insert(Suppression).values(
            email=address, reason=SuppressionReason.UNSUBSCRIBED.value, detail="erased on request",
            created_at=self.at))
        return AddressSuppression.ADDED

    def aliases_(self) -> None:
        """Each alias becomes its own marker: forgetting the person by that id again is
        recognised, and an event for it makes a new profile."""
        if not self.aliases:
            return
        taken = set(self.connection.execute(select(col(CustomerAlias.external_id)).where(
            col(CustomerAlias.external_id).in_([marker(self.secret, alias) for alias in self.aliases]))).scalars())
        renamed = []
        for alias in self.aliases:
            stand_in = marker(self.secret, alias)
            renamed.append({"b_old": alias, "b_new": stand_in if stand_in not in taken else f"{stand_in}/{self.id}"})
        self.connection.execute(update(CustomerAlias).where(col(CustomerAlias.external_id) == bindparam("b_old"))
                                .values(external_id=bindparam("b_new")), renamed)
        self._count(self.anonymised, "customer_aliases", len(renamed))

    def customer_row(self) -> None:
        """The row stays (sends, orders and attributions point at it); nothing personal does."""
        self.connection.execute(update(Customer).where(col(Customer.id) == self.id).values(
            external_id=self.marker, email=None, first_name=None, last_name=None, timezone=None,
            locale=_DEFAULT_LOCALE, marketing_consent=False, consent_at=None, consent_source=None,
            consent_requested_at=None, consent_withdrawn_at=self.at, untracked_at=self.at, forgotten_at=self.at))
        self._count(self.anonymised, "customers", 1)
