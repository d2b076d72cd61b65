"""Ingest: Segment events into the store, idempotent, bad lines reported by number."""

import json

from sqlalchemy import func, select
from sqlmodel import Session

from flows.ingest import ingest_lines
from models import Cart, CartItem, Complaint, Customer, Event, Order, Suppression


def line(**event) -> str:
    return json.dumps(event, ensure_ascii=False)


EVENTS = [
    line(type="identify", userId="u1", timestamp="2026-03-01T10:00:00Z", messageId="m1",
         traits={"email": "Jurgen@Example.DE", "firstName": "Jürgen", "last_name": "Groß", "locale": "de-DE",
                 "timezone": "Europe/Berlin", "marketing_consent": True, "createdAt": "2026-02-01T08:00:00Z"}),
    line(type="track", userId="u1", event="Product Added", timestamp="2026-03-02T10:00:00Z", messageId="m2",
         properties={"product_id": "p1", "name": "Schuh", "price": 59.9, "quantity": 2}),
    line(type="track", userId="u1", event="Product Added", timestamp="2026-03-02T10:05:00Z", messageId="m3",
         properties={"product_id": "p2", "name": "Socke", "price": 5}),
    line(type="track", userId="u1", event="Product Removed", timestamp="2026-03-02T10:06:00Z", messageId="m4",
         properties={"product_id": "p1", "quantity": 1}),
    line(type="track", userId="u1", event="Page Viewed", timestamp="2026-03-03T09:00:00Z", messageId="m5"),
    line(type="track", userId="u2", event="Order Completed", timestamp="2026-03-04T09:00:00Z", messageId="m6",
         properties={"order_id": 1001, "revenue": 120.5, "currency": "eur", "products": [{"product_id": "p1"}]}),
    line(type="track", userId="u1", event="Complaint Received", timestamp="2026-03-05T09:00:00Z", messageId="m7",
         properties={"complaint_id": "K-1", "subject": "Kaputt"}),
    line(type="track", userId="u1", event="Unsubscribed", timestamp="2026-03-06T09:00:00Z", messageId="m8"),
]


def count(session: Session, model) -> int:
    return session.execute(select(func.count()).select_from(model)).scalar_one()


def test_events_build_customers_carts_orders_complaints_and_suppressions(engine) -> None:
    report = ingest_lines(engine, EVENTS)
    assert (report.loaded, report.duplicates, report.errors) == (8, 0, [])
    assert report.complaints == ["K-1"]
    with Session(engine) as session:
        u1 = session.execute(select(Customer).where(Customer.external_id == "u1")).scalar_one()
        assert (u1.email, u1.first_name, u1.last_name, u1.locale) == ("Jurgen@example.de", "Jürgen", "Groß", "de-DE")
        assert u1.created_at.isoformat() == "2026-02-01T08:00:00+00:00"
        assert u1.last_seen_at.isoformat() == "2026-03-06T09:00:00+00:00"
        assert u1.marketing_consent is False  # unsubscribed afterwards
        assert session.get(Suppression, "jurgen@example.de").reason == "unsubscribed"
        cart = session.execute(select(Cart).where(Cart.customer_id == u1.id)).scalar_one()
        items = {i.product_id: (i.quantity, i.price_cents) for i in
                 session.execute(select(CartItem).where(CartItem.cart_id == cart.id)).scalars()}
        assert items == {"p1": (1, 5990), "p2": (1, 500)}
        assert cart.updated_at.isoformat() == "2026-03-02T10:06:00+00:00"
        order = session.execute(select(Order)).scalar_one()
        assert (order.external_id, order.total_cents, order.currency) == ("1001", 12050, "EUR")
        assert session.execute(select(Complaint)).scalar_one().subject == "Kaputt"


def test_ingesting_the_same_events_twice_changes_nothing(engine) -> None:
    ingest_lines(engine, EVENTS)
    with Session(engine) as session:
        before = [count(session, m) for m in (Customer, Cart, CartItem, Order, Complaint, Event)]
    again = ingest_lines(engine, EVENTS)
    assert (again.loaded, again.duplicates) == (0, 8)
    with Session(engine) as session:
        assert [count(session, m) for m in (Customer, Cart, CartItem, Order, Complaint, Event)] == before


def test_bad_lines_are_reported_by_number_and_good_lines_still_load(engine) -> None:
    lines = [
        EVENTS[0],
        "{not json",
        line(type="track", userId="u1", timestamp="2026-03-02T10:00:00Z", messageId="x1",
             event="Product Added", properties={"product_id": "p1", "price": "cheap"}),
        line(type="identify", userId="u3", timestamp="yesterday", messageId="x2"),
        line(type="identify", userId="u4", timestamp="2026-03-02T10:00:00Z", traits={"email": "no-at-sign"}),
        line(type="alias", userId="u5", timestamp="2026-03-02T10:00:00Z"),
        EVENTS[4],
    ]
    report = ingest_lines(engine, lines)
    assert report.loaded == 2
    errors = dict(report.errors)
    assert sorted(errors) == [2, 3, 4, 5, 6]
    assert "not valid JSON" in errors[2]
    assert errors[3].startswith("properties.price: ")
    assert errors[4].startswith("timestamp: ")
    assert errors[5].startswith("traits.email: not a deliverable address")
    assert errors[6].startswith("type: ")


def test_events_without_a_message_id_are_still_deduplicated(engine) -> None:
    plain = line(type="track", userId="u9", event="Page Viewed", timestamp="2026-03-02T10:00:00Z")
    assert ingest_lines(engine, [plain, plain]).duplicates == 1
    assert ingest_lines(engine, [plain]).duplicates == 1
