"""Forgetting a customer (the GDPR erasure): afterwards no row names them, every count is what it was,
it happens once and all at once, and the shop sending the id again makes a new, empty profile."""

import json
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, event, select
from sqlmodel import Session, SQLModel, col

from flows.content.links import send_digest
from flows.feedback.bounces import Report
from flows.feedback.bounces import record as record_feedback
from flows.ingest import ingest_lines
from flows.privacy import AddressSuppression, forget, forgotten_at, marker
from flows.send import claims
from models import (
    Attribution,
    CategoryOptOut,
    ConsentChange,
    Customer,
    Engagement,
    Event,
    FeedbackKind,
    Order,
    Send,
    SendStatus,
    Suppression,
)
from models.identity import customer_by_id
from tests.support import SECRET
from tests.support.builders import NOW, Store

AT = NOW + timedelta(days=1)
START = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


def line(**event: Any) -> str:
    return json.dumps(event, ensure_ascii=False)


@dataclass
class Person:
    """One person as the shop knows them, and everything that names them."""

    prefix: str
    first: str
    last: str

    @property
    def user(self) -> str:
        return f"{self.prefix}-user-7731"

    @property
    def guest(self) -> str:
        return f"{self.prefix}-anon-0c1f"

    @property
    def previous(self) -> str:
        return f"{self.prefix}-legacy-3131"

    @property
    def email(self) -> str:
        return f"{self.first.lower()}.{self.prefix}@example.org"

    @property
    def old_email(self) -> str:
        return f"{self.prefix}.frueher@example.net"

    def needles(self) -> list[str]:
        """What must appear nowhere once they are forgotten (case-insensitively)."""
        return [self.user, self.guest, self.previous, self.email, self.old_email, self.first, self.last,
                f"{self.prefix}-order-1", f"{self.prefix}-k1", f"{self.prefix}-grp"]

    def events(self) -> list[str]:
        """A guest who browsed, signed up, was aliased, ordered, complained, joined a group and moved address."""
        p, t = self.prefix, lambda hours: (START + timedelta(hours=hours)).isoformat()
        return [
            line(type="identify", userId=self.user, timestamp=t(0), messageId=f"{p}-1",
                 traits={"email": self.old_email, "firstName": self.first, "lastName": self.last, "locale": "de-AT",
                         "timezone": "Europe/Vienna", "marketing_consent": True, "consent_confirmed": True}),
            line(type="track", anonymousId=self.guest, event="Product Added", timestamp=t(1), messageId=f"{p}-2",
                 properties={"product_id": "p1", "name": "Wanderschuh", "price": 129.9,
                             "url": "https://shop.example/p1"}),
            line(type="identify", userId=self.user, anonymousId=self.guest, timestamp=t(2), messageId=f"{p}-3",
                 traits={}),
            line(type="alias", previousId=self.previous, userId=self.user, timestamp=t(3), messageId=f"{p}-4"),
            line(type="page", userId=self.user, name=f"Wunschliste {self.first} {self.last}", timestamp=t(4),
                 messageId=f"{p}-5"),
            line(type="track", userId=self.user, event="Order Completed", timestamp=t(5), messageId=f"{p}-6",
                 properties={"order_id": f"{p}-order-1", "total": 129.9, "currency": "EUR",
                             "products": [{"product_id": "p1", "name": f"Gravur: {self.first} {self.last}"}]}),
            line(type="track", userId=self.user, event="Complaint Received", timestamp=t(6), messageId=f"{p}-7",
                 properties={"complaint_id": f"{p}-k1", "subject": f"Paket für {self.first} {self.last} fehlt"}),
            line(type="group", userId=self.user, groupId=f"{p}-grp", timestamp=t(7), messageId=f"{p}-8",
                 traits={"name": f"{self.last} GmbH"}),
            line(type="identify", userId=self.user, timestamp=t(8), messageId=f"{p}-9", traits={"email": self.email}),
            line(type="track", userId=self.user, event="Product Added", timestamp=t(9), messageId=f"{p}-10",
                 properties={"product_id": "p2", "name": "Socke", "price": 5}),
        ]


ANNA = Person("wq", "Wilhelmina", "Quastenflosser")
BERT = Person("bz", "Bartholomäus", "Zwiebelfisch")


def mailed(engine: Engine, customer_id: int, who: Person) -> dict[str, Send]:
    """Their ledger as runs leave it, through the claims (one transaction per step): sent (with the
    relay's reply naming the address, and tracked links), held out, failed (an error naming them), and
    a service mail. By occurrence."""
    def claim(trigger: str, occurrence: str, email: str, category: str = "marketing",
              links: tuple[str, ...] = ()) -> claims.Claim:
        key = f"{trigger}/{customer_id}/{occurrence}"
        return claims.Claim(key, trigger, customer_id, occurrence, "new", f"{trigger}/default.de.html.j2", email,
                            f"<{send_digest(SECRET, key)}@shop.example>", category=category, links=links)

    old = claim("winback", "2026-01", who.old_email, links=("https://shop.example/p1",))
    failed = claim("winback", "2026-02", who.email)
    onboarding = claim("onboarding", "day-3", who.email, links=("https://shop.example/",))
    service = claim("complaint", "k1", who.email, category="transactional")
    held = claim("abandoned_cart", "c1", who.email)
    assert len(claims.claim(engine, [old, failed, onboarding, service], "run-1", START)) == 4
    claims.record(engine, [
        claims.Decision(old.send_key, SendStatus.SENT, reply=f"250 2.0.0 <{who.old_email}> queued as 4F2A"),
        claims.Decision(failed.send_key, SendStatus.FAILED,
                        error=f"550 5.1.1 <{who.email.upper()}>: no mailbox for {who.first} {who.last}"),
        claims.Decision(onboarding.send_key, SendStatus.SENT), claims.Decision(service.send_key, SendStatus.SENT)])
    assert claims.hold_out(engine, [held], "run-1", START) == {held.send_key}
    with Session(engine) as session:
        return {row.occurrence: row for row in session.execute(
            select(Send).where(col(Send.customer_id) == customer_id)).scalars()}


def person(engine: Engine, who: Person) -> int:
    """``who`` through real ingest, then mailed, clicked, bounced, attributed; their customer id."""
    report = ingest_lines(engine, who.events())
    assert report.ok, report.errors
    with Session(engine) as session:
        customer = customer_by_id(session, who.user)
        assert customer is not None and customer.id is not None
        cid = customer.id
        order = session.execute(select(Order).where(col(Order.customer_id) == cid)).scalar_one()
    sends = mailed(engine, cid, who)
    old = sends["2026-01"]
    record_feedback(engine, [
        Report(f"dsn:{who.prefix}-1", who.email, FeedbackKind.SOFT_BOUNCE, "dsn", START, "4.2.2",
               f"452 4.2.2 <{who.email}>: mailbox of {who.first} full", send_key=sends["day-3"].send_key),
        Report(f"dsn:{who.prefix}-2", who.old_email, FeedbackKind.HARD_BOUNCE, "dsn", START, "5.1.1",
               f"550 5.1.1 <{who.old_email}> unknown"),  # names no send of ours
    ])
    with Session(engine) as session:
        session.add(Engagement(send_id=old.id, customer_id=cid, kind="click", link=0, at=START))
        session.add(Engagement(send_id=old.id, customer_id=cid, kind="open", at=START, machine="too_soon"))
        session.add(Attribution(order_id=order.id, customer_id=cid, placed_at=order.placed_at,
                                total_cents=order.total_cents, currency=order.currency, send_id=old.id,
                                trigger="winback", stage="new", template=old.template, basis="click",
                                touched_at=START))
        session.add(CategoryOptOut(customer_id=cid, category="winback", created_at=START))
        session.add(ConsentChange(customer_id=cid, at=START, change="categories", source="preference page",
                                  detail=f"left winback ({who.email})"))
        session.commit()
    return cid


def every_value(engine: Engine) -> list[tuple[str, str, str]]:
    """(table, column, value as text) for every non-empty value of every table the models know."""
    found = []
    with engine.connect() as connection:
        for table in SQLModel.metadata.sorted_tables:
            for row in connection.execute(select(table)).mappings():
                for name, value in row.items():
                    if value is not None:
                        text = json.dumps(value, ensure_ascii=False) if isinstance(value, dict | list) else str(value)
                        found.append((table.name, name, text))
    return found


def snapshot(engine: Engine) -> dict[str, list[str]]:
    """Every row of every table, as text, in a stable order."""
    tables: dict[str, list[str]] = {}
    with engine.connect() as connection:
        for table in SQLModel.metadata.sorted_tables:
            tables[table.name] = sorted(repr(tuple(row)) for row in connection.execute(select(table)))
    return tables


def ledger_counts(engine: Engine) -> Counter[tuple[str, str, str]]:
    with Session(engine) as session:
        return Counter(tuple(row) for row in session.execute(select(Send.trigger, Send.category, Send.status)))


def revenue(engine: Engine) -> list[tuple[Any, ...]]:
    with Session(engine) as session:
        return sorted(session.execute(select(Order.id, Order.customer_id, Order.placed_at, Order.total_cents,
                                             Order.currency)).all())


def attributions(engine: Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as connection:
        return sorted(tuple(row) for row in connection.execute(select(Attribution.__table__)))  # type: ignore[attr-defined]


@pytest.fixture
def anna(engine: Engine) -> int:
    """Anna's customer id: the one to be forgotten, alone in the store."""
    return person(engine, ANNA)


@pytest.fixture
def two(engine: Engine) -> tuple[int, int]:
    """Anna's and Bert's customer ids: one to forget, one to leave alone."""
    return person(engine, ANNA), person(engine, BERT)


def naming(engine: Engine, who: Person) -> dict[str, set[tuple[str, str]]]:
    """Which of ``who``'s identifiers appear where: needle → {(table, column)}, every table scanned."""
    found: dict[str, set[tuple[str, str]]] = {}
    for table, column, text in every_value(engine):
        for needle in who.needles():
            if needle.lower() in text.lower():
                found.setdefault(needle, set()).add((table, column))
    return found


def test_afterwards_no_row_of_any_table_names_them_but_the_suppression_of_their_address(engine, two) -> None:
    before = naming(engine, ANNA)
    assert set(before) == set(ANNA.needles())  # every identifier is somewhere: the scan can see them
    assert {"events", "sends", "feedback", "customers"} <= {table for found in before.values() for table, _ in found}

    result = forget(engine, ANNA.user, secret=SECRET, at=AT)

    assert result.found and not result.already and result.marker == marker(SECRET, ANNA.user)
    # A do-not-contact list keeps the address (and what the address itself spells), and nothing else.
    after = naming(engine, ANNA)
    assert ANNA.email in after and {where for found in after.values() for where in found} == {("suppressions", "email")}
    assert set(naming(engine, BERT)) == set(BERT.needles())


def test_what_goes_is_deleted_and_what_stays_keeps_no_personal_field(engine, anna) -> None:
    result = forget(engine, ANNA.user, secret=SECRET, at=AT)

    with Session(engine) as session:
        customer = session.get(Customer, anna)
        assert customer is not None
        assert (customer.external_id, customer.email, customer.first_name, customer.last_name, customer.timezone,
                customer.locale) == (result.marker, None, None, None, None, "en")
        assert (customer.marketing_consent, customer.forgotten_at, customer.untracked_at) == (False, AT, AT)
        assert session.execute(select(Engagement).where(col(Engagement.customer_id) == anna)).first() is None
        orders = session.execute(select(Order).where(col(Order.customer_id) == anna)).scalars().all()
        assert [(o.products, o.total_cents, o.currency) for o in orders] == [([], 12990, "EUR")]
        events = session.execute(select(Event).where(col(Event.user_id) == result.marker)).scalars().all()
        assert len(events) == len(ANNA.events()) and all(e.payload == {} for e in events)
        changes = session.execute(select(ConsentChange).where(col(ConsentChange.customer_id) == anna)
                                  .order_by(col(ConsentChange.id))).scalars().all()
        assert [(c.change, c.source, c.detail) for c in changes][-1] == ("withdrawn", "erasure", "")
        assert all(c.detail == "" for c in changes)
        sends = session.execute(select(Send).where(col(Send.customer_id) == anna)).scalars().all()
        assert {s.email for s in sends} == {f"forgotten-{s.id}@invalid" for s in sends}
        assert all(s.links is None and s.smtp_reply == "" for s in sends)
        assert any("[forgotten]" in s.error and s.error.startswith("550 5.1.1") for s in sends)
    assert result.deleted == {"engagements": 2, "cart_items": 2, "carts": 2, "category_opt_outs": 1,
                              "customer_groups": 1}
    assert result.anonymised["events"] == len(ANNA.events())
    assert (result.anonymised["sends"], result.anonymised["orders"], result.anonymised["complaints"],
            result.anonymised["feedback"], result.anonymised["customer_aliases"]) == (5, 1, 1, 2, 2)


def test_the_ledgers_counts_the_orders_revenue_and_the_attributions_are_the_same_afterwards(engine, two) -> None:
    counts, money, attributed = ledger_counts(engine), revenue(engine), attributions(engine)
    assert counts[("winback", "marketing", "failed")] == 2 and counts[("onboarding", "marketing", "bounced")] == 2

    forget(engine, ANNA.user, secret=SECRET, at=AT)

    assert ledger_counts(engine) == counts
    assert revenue(engine) == money
    assert attributions(engine) == attributed


def test_forgetting_again_by_any_of_their_ids_changes_nothing_and_says_already(engine, anna) -> None:
    first = forget(engine, ANNA.user, secret=SECRET, at=AT)
    before = snapshot(engine)

    for known_as in (ANNA.user, ANNA.guest, ANNA.previous, first.marker):
        again = forget(engine, known_as, secret=SECRET, at=AT + timedelta(days=1))
        assert (again.found, again.already, again.changed, again.deleted, again.anonymised) == (
            True, True, False, {}, {})
        assert "forgotten before: nothing changed" in again.summary(known_as)
        assert forgotten_at(engine, known_as, secret=SECRET) == AT
    assert snapshot(engine) == before


def test_an_unknown_id_is_reported_as_unknown_and_nothing_changes(engine, anna) -> None:
    before = snapshot(engine)

    result = forget(engine, "nobody-4242", secret=SECRET, at=AT)

    assert (result.found, result.already, result.marker) == (False, False, "")
    assert "nothing changed" in result.summary("nobody-4242")
    assert forgotten_at(engine, "nobody-4242", secret=SECRET) is None
    assert snapshot(engine) == before


def _rows_of(engine: Engine, customer_id: int, who: Person) -> dict[str, list[str]]:
    """Every row that is ``who``'s: by customer id, by their ids, their carts, their sends' reports, their address."""
    rows = {}
    with engine.connect() as connection:
        for table in SQLModel.metadata.sorted_tables:
            conditions = [column == customer_id for column in table.columns
                          if any(fk.column.table.name == "customers" for fk in column.foreign_keys)]
            if table.name == "customers":
                conditions.append(table.c.id == customer_id)
            if table.name == "events":
                conditions.append(table.c.user_id.in_([who.user, who.guest, who.previous]))
            if table.name == "cart_items":
                conditions.append(table.c.cart_id.in_(select(SQLModel.metadata.tables["carts"].c.id)
                                                      .where(SQLModel.metadata.tables["carts"].c.customer_id ==
                                                             customer_id)))
            if table.name in ("feedback", "suppressions"):
                conditions.append(table.c.email.in_([who.email, who.old_email]))
            for condition in conditions:
                rows.setdefault(table.name, []).extend(
                    repr(tuple(row)) for row in connection.execute(select(table).where(condition)))
    return {name: sorted(found) for name, found in rows.items()}


def test_other_customers_and_their_suppressions_are_untouched(engine, two) -> None:
    _, bert = two
    with Session(engine) as session:
        session.add(Suppression(email=BERT.old_email, reason="hard_bounce", detail="550 5.1.1 unknown"))
        session.commit()
    before = _rows_of(engine, bert, BERT)
    assert len(before["sends"]) == 5 and len(before["events"]) == len(BERT.events())

    forget(engine, ANNA.user, secret=SECRET, at=AT)

    assert _rows_of(engine, bert, BERT) == before


def test_a_failure_half_way_leaves_the_store_exactly_as_it_was(engine, anna) -> None:
    before = snapshot(engine)

    def fail_at_the_ledger(_connection: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE SENDS"):  # after events, carts, orders, feedback…
            raise RuntimeError("the database went away")

    event.listen(engine, "before_cursor_execute", fail_at_the_ledger)
    try:
        with pytest.raises(RuntimeError, match="went away"):
            forget(engine, ANNA.user, secret=SECRET, at=AT)
    finally:
        event.remove(engine, "before_cursor_execute", fail_at_the_ledger)

    assert snapshot(engine) == before
    assert forget(engine, ANNA.user, secret=SECRET, at=AT).changed  # and it was that failure, nothing else


def test_the_shop_sending_the_id_again_makes_a_new_profile_and_a_replayed_export_brings_nothing_back(
        engine, anna) -> None:
    first = forget(engine, ANNA.user, secret=SECRET, at=AT)

    replay = ingest_lines(engine, ANNA.events())  # an old export, loaded again
    assert (replay.loaded, replay.duplicates) == (0, len(ANNA.events()))
    with Session(engine) as session:
        assert customer_by_id(session, ANNA.user) is None

    later = ingest_lines(engine, [line(type="identify", userId=ANNA.user, timestamp=AT.isoformat(),
                                       messageId="wq-new-1", traits={"email": ANNA.email, "firstName": ANNA.first})])
    assert later.loaded == 1
    with Session(engine) as session:
        fresh = customer_by_id(session, ANNA.user)
        assert fresh is not None and fresh.id != anna and fresh.forgotten_at is None
        assert (fresh.email, fresh.marketing_consent) == (ANNA.email, False)  # nothing carried over
        # Marketing to the address waits for a new confirmed opt-in (which lifts an unsubscribe).
        suppression = session.get(Suppression, ANNA.email)
        assert suppression is not None and suppression.reason == "unsubscribed"

    second = forget(engine, ANNA.user, secret=SECRET, at=AT + timedelta(days=1))
    assert second.changed and second.marker == f"{first.marker}/{fresh.id}"
    assert forget(engine, ANNA.user, secret=SECRET, at=AT).already


def test_an_erased_address_stays_suppressed_and_a_shared_one_is_left_to_the_other_record(store: Store) -> None:
    plain = store.customer("Ottilie", email="ottilie@example.org")
    unsubscribed = store.customer("Ruprecht", email="ruprecht@example.org")
    store.suppress("ruprecht@example.org", reason="hard_bounce")
    shared, other = (store.customer(name, email="familie@example.org") for name in ("Kunigunde", "Theodor"))

    outcomes = [forget(store.engine, c.external_id, secret=SECRET, at=AT).suppression
                for c in (plain, unsubscribed, shared)]

    assert outcomes == [AddressSuppression.ADDED, AddressSuppression.KEPT, AddressSuppression.SHARED]
    with Session(store.engine) as session:
        reasons = dict(session.execute(select(Suppression.email, Suppression.reason)).all())
        assert reasons == {"ottilie@example.org": "unsubscribed", "ruprecht@example.org": "hard_bounce"}
        kept = session.get(Customer, other.id)
        assert kept is not None and kept.email == "familie@example.org" and kept.forgotten_at is None


def test_the_marker_is_keyed_with_the_secret_and_stable() -> None:
    import hashlib

    assert marker(SECRET, "42") == marker(SECRET, "42") != marker("another-secret-0123456789", "42")
    assert marker(SECRET, "42") != marker(SECRET, "43")
    assert hashlib.sha256(b"42").hexdigest()[:24] not in marker(SECRET, "42")
    assert marker(SECRET, "42").startswith("forgotten:") and len(marker(SECRET, "42")) == len("forgotten:") + 24
