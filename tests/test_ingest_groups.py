"""``flows.ingest.apply_events``, the one loader behind ``lifecycle ingest`` and the tracking API:
a group of events in one transaction, optimistic first, exact (a savepoint per event) when
anything is refused; both passes must leave the same store, and concurrent groups must
lose and duplicate nothing."""

import json
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event as hypothesis_event
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select, text
from sqlmodel import Session, SQLModel

from flows.ingest import DUPLICATE, _apply, _Parsed, _Store, apply_events, parse_event
from models.db import create_schema, make_engine, writer

BASE = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
RECEIVED = BASE + timedelta(days=1)


def at(minutes: float) -> str:
    return (BASE + timedelta(minutes=minutes)).isoformat().replace("+00:00", "Z")


def product(product_id: str, quantity: int = 1, price: float = 19.9, **more: Any) -> dict[str, Any]:
    return {"product_id": product_id, "name": f"Artikel {product_id}", "price": price, "quantity": quantity,
            "url": f"https://shop.example/p/{product_id}", **more}


# A shop's day, as its backend and storefront send it: a guest who browses, fills a cart and
# signs up (merged), a customer asking to opt in, then withdrawing, carts, an order, a
# complaint and its answer, an alias, a group, and two refusals (a bad address, an order
# loaded twice). Events carry no sentAt: over HTTP their timestamps stand as sent.
SHOP_DAY: list[dict[str, Any]] = [
    {"type": "page", "anonymousId": "anon-1", "name": "Home", "messageId": "d01", "timestamp": at(0),
     "context": {"locale": "de-DE", "page": {"path": "/"}}},
    {"type": "track", "anonymousId": "anon-1", "event": "Product Added", "messageId": "d02", "timestamp": at(1),
     "properties": product("p1", 2, cart_id="cart-anon-1")},
    {"type": "identify", "userId": "u1", "anonymousId": "anon-1", "messageId": "d03", "timestamp": at(2),
     "traits": {"email": "Jana.Kraus@Example.DE", "firstName": "Jana", "lastName": "Kraus", "locale": "de-DE",
                "marketing_consent": True, "consent_confirmed": True, "consent_source": "checkout"}},
    {"type": "identify", "userId": "u2", "messageId": "d04", "timestamp": at(3),
     "traits": {"email": "tom@example.de", "first_name": "Tom", "marketing_consent": True}},
    {"type": "track", "userId": "u2", "event": "Product Added", "messageId": "d05", "timestamp": at(4),
     "properties": product("p2", 3, price=5.25)},
    {"type": "track", "userId": "u2", "event": "Product Removed", "messageId": "d06", "timestamp": at(5),
     "properties": product("p2", 1)},
    {"type": "track", "userId": "u2", "event": "Product Added", "messageId": "d07", "timestamp": at(6),
     "properties": product("p3", price=120)},
    {"type": "track", "userId": "u1", "event": "Order Completed", "messageId": "d08", "timestamp": at(7),
     "properties": {"order_id": "o-1", "total": 39.8, "currency": "eur", "cart_id": "cart-anon-1",
                    "products": [product("p1", 2)]}},
    {"type": "alias", "previousId": "legacy-42", "userId": "u2", "messageId": "d09", "timestamp": at(8)},
    {"type": "track", "userId": "u1", "event": "Complaint Received", "messageId": "d10", "timestamp": at(9),
     "properties": {"complaint_id": "k-1", "subject": "Paket beschädigt"}},
    {"type": "group", "userId": "u2", "groupId": "firma-7", "messageId": "d11", "timestamp": at(10),
     "traits": {"name": "Firma 7", "plan": "b2b"}},
    {"type": "identify", "userId": "u3", "messageId": "d12", "timestamp": at(11),
     "traits": {"email": "not an address"}},  # refused: no deliverable address
    {"type": "identify", "userId": "u2", "messageId": "d13", "timestamp": at(12),
     "traits": {"marketing_consent": False}},
    {"type": "track", "userId": "u2", "event": "Order Completed", "messageId": "d14", "timestamp": at(13),
     "properties": {"order_id": "o-1", "total": 10}},  # refused: o-1 was loaded from d08
    {"type": "screen", "userId": "u1", "name": "Orders", "messageId": "d15", "timestamp": at(14)},
    {"type": "track", "userId": "u1", "event": "Complaint Answered", "messageId": "d16", "timestamp": at(15),
     "properties": {"complaint_id": "k-1"}},
    {"type": "track", "userId": "legacy-42", "event": "Product Viewed", "messageId": "d17", "timestamp": at(16),
     "properties": {"product_id": "p9"}},
]
REFUSED = {11: "traits.email: not a deliverable address",  # the index in SHOP_DAY → how its reason begins
           13: "order 'o-1' was already loaded from another event"}


def parsed(events: list[dict[str, Any]], source: str = "ingest") -> list[_Parsed]:
    return [parse_event(json.loads(json.dumps(event)), source, RECEIVED) for event in events]


def loadable(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Those the model reads (the loader refuses the rest by its rules)."""
    good = []
    for event in events:
        try:
            parse_event(json.loads(json.dumps(event)))
        except ValueError:
            continue
        good.append(event)
    return good


def snapshot(engine: Engine, events_only: tuple[str, ...] | None = None) -> dict[str, list[Any]]:
    """Every table's rows, comparable between two stores: surrogate ids replaced by the external
    ids they stand for, rows sorted. ``events_only``: the events' columns to keep."""
    tables = SQLModel.metadata.tables
    with engine.connect() as connection:
        customers = dict(connection.execute(select(tables["customers"].c.id, tables["customers"].c.external_id)).all())
        carts = dict(connection.execute(select(tables["carts"].c.id, tables["carts"].c.external_id)).all())
        found: dict[str, list[Any]] = {}
        for name, table in sorted(tables.items()):
            rows = []
            for row in connection.execute(select(table)).mappings():
                values = {key: value for key, value in row.items() if key != "id"}
                if "customer_id" in values:
                    values["customer_id"] = customers.get(values["customer_id"], values["customer_id"])
                if name == "cart_items":
                    values["cart_id"] = carts[values["cart_id"]]
                if name == "events" and events_only is not None:
                    values = {key: values[key] for key in events_only}
                rows.append(values)
            found[name] = sorted(rows, key=lambda values: json.dumps(values, sort_keys=True, default=str))
    return found


@pytest.fixture
def twins(tmp_path: Path) -> tuple[Engine, Engine]:
    """Two fresh SQLite stores."""
    engines = []
    for name in ("one", "two"):
        engine = make_engine(f"sqlite:///{tmp_path / name}.db")
        create_schema(engine)
        engines.append(engine)
    return engines[0], engines[1]


def test_the_optimistic_and_the_exact_pass_leave_the_same_store(twins: tuple[Engine, Engine]) -> None:
    optimistic_store, exact_store = twins
    events = parsed([event for index, event in enumerate(SHOP_DAY) if index not in REFUSED])
    optimistic = apply_events(optimistic_store, events)
    exact = _apply(exact_store, events, exact=True)
    assert not optimistic.exact  # nothing refused: the fast pass was taken
    assert optimistic.outcomes == exact.outcomes == [None] * len(events)
    assert (optimistic.complaints, optimistic.merged, optimistic.addresses) == \
           (exact.complaints, exact.merged, exact.addresses) == (["k-1"], 1, {"jana.kraus@example.de",
                                                                            "tom@example.de"})
    assert snapshot(optimistic_store) == snapshot(exact_store)
    store = snapshot(optimistic_store)
    assert sorted(c["external_id"] for c in store["customers"]) == ["u1", "u2"]  # the guest merged into u1
    assert {(a["external_id"], a["customer_id"]) for a in store["customer_aliases"]} == {
        ("anon-1", "u1"), ("legacy-42", "u2")}
    assert [(o["external_id"], o["customer_id"], o["total_cents"], o["currency"]) for o in store["orders"]] == \
           [("o-1", "u1", 3980, "EUR")]


def test_a_refused_event_keeps_the_rest_of_its_group_and_says_why(twins: tuple[Engine, Engine],
                                                                  tmp_path: Path) -> None:
    """The group's 2nd order for o-1 is refused by the store's rule; the group is loaded again
    without it (still optimistically), and every other event is stored, as a group without
    it would have been; the exact pass (one savepoint per event) says the same."""
    with_refusal, without = twins
    good = loadable(SHOP_DAY)
    refused_at = good.index(SHOP_DAY[13])
    applied = apply_events(with_refusal, parsed(good))
    assert not applied.exact
    exact_store = make_engine(f"sqlite:///{tmp_path / 'exact.db'}")
    create_schema(exact_store)
    assert _apply(exact_store, parsed(good), exact=True).outcomes == applied.outcomes
    assert [i for i, outcome in enumerate(applied.outcomes) if outcome is not None] == [refused_at]
    assert applied.outcomes[refused_at] == REFUSED[13]
    apply_events(without, parsed([event for event in good if event is not SHOP_DAY[13]]))
    assert snapshot(with_refusal) == snapshot(without)


def test_duplicates_within_a_group_and_across_groups_are_stored_once(twins: tuple[Engine, Engine]) -> None:
    store, once = twins
    good = [event for index, event in enumerate(SHOP_DAY) if index not in REFUSED]
    first, second = good[:8], good[8:]
    applied = apply_events(store, parsed([*first, first[0], first[3]]))  # a client's retry within one group
    assert applied.outcomes == [None] * 8 + [DUPLICATE, DUPLICATE] and not applied.exact
    again = apply_events(store, parsed([first[1], *second, first[7]]))  # and in a later one
    assert again.outcomes == [DUPLICATE] + [None] * len(second) + [DUPLICATE] and not again.exact
    apply_events(once, parsed(good))
    assert snapshot(store, events_only=("message_id", "type", "name", "user_id", "timestamp")) == \
           snapshot(once, events_only=("message_id", "type", "name", "user_id", "timestamp"))


# -- any group: optimistic == exact ------------------------------------------------------

PEOPLE = ["u1", "u2", "anon-1", "anon-2"]


@st.composite
def shop_events(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A random group from a small vocabulary, so that events meet: the same people, carts,
    products, orders and complaints; guests claimed and aliased; out of order in time."""
    events: list[dict[str, Any]] = []
    orders = complaints = 0
    for number in range(draw(st.integers(1, 14))):
        who = draw(st.sampled_from(PEOPLE))
        ids = {"userId": who} if who.startswith("u") else {"anonymousId": who}
        kind = draw(st.sampled_from(["page", "identify", "claim", "alias", "added", "added", "removed", "order",
                                     "complaint", "answer", "group", "unsubscribed", "repeat"]))
        base = {"messageId": f"r{number}", "timestamp": at(draw(st.integers(0, 30)))}
        cart = draw(st.sampled_from([None, "cart-1", "cart-2"]))
        item = product(draw(st.sampled_from(["p1", "p2"])), draw(st.integers(1, 3)),
                       **({"cart_id": cart} if cart else {}))
        if kind == "repeat" and events:
            events.append(draw(st.sampled_from(events)))
            continue
        if kind == "page":
            event = {"type": "page", **ids, "name": "Home"}
        elif kind == "identify":
            consent = draw(st.sampled_from([{}, {"marketing_consent": True}, {"marketing_consent": False},
                                            {"marketing_consent": True, "consent_confirmed": True}]))
            event = {"type": "identify", **ids, "traits": {
                "email": f"{who}@example.de" if draw(st.booleans()) else "shared@example.de", **consent}}
        elif kind == "claim":
            event = {"type": "identify", "userId": draw(st.sampled_from(["u1", "u2"])),
                     "anonymousId": draw(st.sampled_from(["anon-1", "anon-2"])), "traits": {}}
        elif kind == "alias":
            event = {"type": "alias", "userId": draw(st.sampled_from(["u1", "u2"])),
                     "previousId": draw(st.sampled_from([*PEOPLE, "legacy"]))}
        elif kind in ("added", "removed"):
            event = {"type": "track", **ids, "event": "Product Added" if kind == "added" else "Product Removed",
                     "properties": item}
        elif kind == "order":
            orders += 1
            event = {"type": "track", **ids, "event": "Order Completed", "properties": {
                "order_id": f"o{orders}", "total": 12.5, **({"cart_id": cart} if cart else {})}}
        elif kind == "complaint":
            complaints += 1
            event = {"type": "track", **ids, "event": "Complaint Received",
                     "properties": {"complaint_id": f"k{complaints}"}}
        elif kind == "answer":
            event = {"type": "track", **ids, "event": "Complaint Answered",
                     "properties": {"complaint_id": f"k{draw(st.integers(1, max(complaints, 1)))}"}}
        elif kind == "group":
            event = {"type": "group", **ids, "groupId": "g1", "traits": {"n": number}}
        else:
            event = {"type": "track", **ids, "event": "Unsubscribed"}
        events.append({**base, **event})
    return events


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "empty.db"
    engine = make_engine(f"sqlite:///{path}")
    create_schema(engine)
    engine.dispose()
    return path


@settings(max_examples=20)
@given(events=shop_events())
def test_any_group_loads_the_same_optimistically_and_exactly(empty_store: Path, tmp_path_factory:
                                                              pytest.TempPathFactory, events: list[Any]) -> None:
    folder = tmp_path_factory.mktemp("example")
    engines = []
    for name in ("optimistic", "exact"):
        shutil.copy(empty_store, folder / f"{name}.db")
        engines.append(make_engine(f"sqlite:///{folder / name}.db"))
    try:
        group = parsed(events)
        optimistic, exact = apply_events(engines[0], group), _apply(engines[1], group, exact=True)
        hypothesis_event(f"refused: {optimistic.exact}")
        assert optimistic.outcomes == exact.outcomes
        assert (optimistic.complaints, optimistic.merged, optimistic.addresses) == \
               (exact.complaints, exact.merged, exact.addresses)
        assert snapshot(engines[0]) == snapshot(engines[1])
    finally:
        for engine in engines:
            engine.dispose()


# -- concurrent writers --------------------------------------------------------------------


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_concurrent_groups_creating_one_customer_lose_and_duplicate_nothing(engine: Engine) -> None:
    """Two writers (two requests' groups in ``lifecycle web``, or an ingest and a request) load
    at once groups that create the same new customer and share messageIds (a client's retry):
    each event ends up stored once, and none is reported refused."""
    rounds, exact_passes = 12, 0
    for round_ in range(rounds):
        person = f"new-{round_}"

        def event(number: int, person: str = person, round_: int = round_) -> dict[str, Any]:
            kinds = [{"type": "identify", "traits": {"email": f"{person}@example.de"}},
                     {"type": "track", "event": "Product Added", "properties": product("p1")},
                     {"type": "page", "name": "Cart"}]
            return {"userId": person, "messageId": f"c{round_}-{number}", "timestamp": at(number),
                    **kinds[number % 3]}

        groups = [parsed([event(n) for n in range(0, 6)]), parsed([event(n) for n in range(3, 9)])]
        results: list[Any] = [None, None]
        start = threading.Barrier(2)

        def load(which: int, groups: list[list[_Parsed]] = groups, results: list[Any] = results,
                 start: threading.Barrier = start) -> None:
            start.wait()
            try:
                results[which] = apply_events(engine, groups[which])
            except Exception as exc:  # noqa: BLE001 - reported below, with the round
                results[which] = exc

        threads = [threading.Thread(target=load, args=(which,)) for which in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not any(isinstance(result, Exception) for result in results), (round_, results)
        outcomes = {}
        for group, result in zip(groups, results, strict=True):
            exact_passes += result.exact
            for parsed_event, outcome in zip(group, result.outcomes, strict=True):
                assert outcome in (None, DUPLICATE), (round_, parsed_event.message_id, outcome)
                outcomes.setdefault(parsed_event.message_id, []).append(outcome)
        assert all(found.count(None) == 1 for found in outcomes.values()), (round_, outcomes)
        store = snapshot(engine, events_only=("message_id", "user_id"))
        mine = [row for row in store["events"] if row["user_id"] == person]
        assert sorted(row["message_id"] for row in mine) == sorted(f"c{round_}-{n}" for n in range(9))
        assert [c["external_id"] for c in store["customers"]].count(person) == 1
    print(f"{exact_passes} of {2 * rounds} groups met the other writer's rows and were loaded again exactly")


def test_an_item_emptied_and_added_again_in_one_group_needs_no_second_pass(twins: tuple[Engine, Engine]) -> None:
    """Product Removed to nothing, then Product Added of the same product: the item's row is
    deleted before the new one is written, so the optimistic pass holds (the cart's unique
    product key is not met)."""
    store, _ = twins
    moment = "2026-03-02T10:00:0{}Z"
    first = [{"type": "track", "userId": "u9", "event": "Product Added", "messageId": "a1",
              "timestamp": moment.format(1), "properties": {"product_id": "p", "price": 5, "quantity": 1}}]
    apply_events(store, parsed(first))
    again = [{"type": "track", "userId": "u9", "event": "Product Removed", "messageId": "r1",
              "timestamp": moment.format(2), "properties": {"product_id": "p", "quantity": 1}},
             {"type": "track", "userId": "u9", "event": "Product Added", "messageId": "a2",
              "timestamp": moment.format(3), "properties": {"product_id": "p", "price": 6, "quantity": 2}}]
    applied = apply_events(store, parsed(again))
    assert applied.outcomes == [None, None] and not applied.exact
    items = snapshot(store)["cart_items"]
    assert [(item["product_id"], item["quantity"], item["price_cents"]) for item in items] == [("p", 2, 600)]


def stored(engine: Engine) -> set[str]:
    with engine.connect() as connection:
        return set(connection.execute(select(SQLModel.metadata.tables["events"].c.message_id)).scalars())


@contextmanager
def held_by_another_writer(engine: Engine, external_id: str) -> Iterator[None]:
    """A transaction that holds the customer's row, as another writer's group does, until the block ends."""
    customers = SQLModel.metadata.tables["customers"]
    with engine.connect() as other, other.begin():
        other.execute(select(customers.c.id).where(customers.c.external_id == external_id).with_for_update())
        yield


def loading(engine: Engine, group: list[_Parsed]) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []
    loader = threading.Thread(target=lambda: result.append(apply_events(engine, group)))
    loader.start()
    return loader, result


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_customer_another_writer_holds_delays_only_their_own_events(engine: Engine) -> None:
    """While another writer's transaction holds a customer, a group commits everyone else's
    events at once and loads that customer's (and what shares anything with them) once the
    other has committed, in their order: an alias
    naming the held customer, then a page view by the id the alias introduced, land on the held
    customer (not on a new guest made of the id)."""
    apply_events(engine, parsed([{"type": "identify", "userId": "held", "messageId": "h0", "timestamp": at(0),
                                  "traits": {"email": "held@example.de"}}]))
    group = parsed([
        {"type": "page", "userId": "free", "name": "Home", "messageId": "f1", "timestamp": at(1)},
        {"type": "alias", "previousId": "guest-7", "userId": "held", "messageId": "h1", "timestamp": at(2)},
        {"type": "page", "anonymousId": "guest-7", "name": "Cart", "messageId": "h2", "timestamp": at(3)},
        {"type": "track", "userId": "free", "event": "Product Viewed", "messageId": "f2", "timestamp": at(4),
         "properties": product("p1")},
        {"type": "track", "userId": "free", "event": "Product Added", "messageId": "f3", "timestamp": at(5),
         "properties": product("p1")},  # a change that shares nothing with those left for later
    ])
    customers = SQLModel.metadata.tables["customers"]
    with held_by_another_writer(engine, "held"):
        loader, result = loading(engine, group)
        for _ in range(200):
            if {"f1", "f2", "f3"} <= stored(engine):
                break
            loader.join(0.05)
        assert stored(engine) == {"h0", "f1", "f2", "f3"}  # committed while "held" is still held
        assert loader.is_alive()  # and waiting for it
    loader.join(30)
    [applied] = result
    assert applied.outcomes == [None, None, None, None, None] and applied.deferred == []
    assert stored(engine) == {"h0", "f1", "h1", "h2", "f2", "f3"}
    with engine.connect() as connection:
        people = dict(connection.execute(select(customers.c.external_id, customers.c.last_seen_at)).all())
    assert set(people) == {"held", "free"}  # guest-7 is an alias of "held", not a customer of its own
    assert people["held"] is not None and people["held"].isoformat().startswith(at(3).removesuffix("Z"))


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_repeat_of_an_event_left_for_later_waits_with_it(engine: Engine) -> None:
    """The first of two events with one messageId is the one stored, even when its customer is
    held and the repeat's is not."""
    apply_events(engine, parsed([{"type": "identify", "userId": "held", "messageId": "h0", "timestamp": at(0),
                                  "traits": {"email": "held@example.de"}}]))
    group = parsed([{"type": "page", "userId": "held", "name": "Home", "messageId": "m1", "timestamp": at(1)},
                    {"type": "page", "userId": "free", "name": "Home", "messageId": "m1", "timestamp": at(1)}])
    with held_by_another_writer(engine, "held"):
        loader, result = loading(engine, group)
        loader.join(1)
    loader.join(30)
    assert result[0].outcomes == [None, DUPLICATE]
    events = SQLModel.metadata.tables["events"]
    with engine.connect() as connection:
        assert connection.execute(select(events.c.user_id).where(events.c.message_id == "m1")).scalars().all() \
            == ["held"]


# What other writers hold must change nothing: each case is loaded while "held" is held, and
# compared with the same events loaded one at a time, in order, into a store of its own.
HELD_AND_FREE = [{"type": "identify", "userId": "held", "messageId": "s0", "timestamp": at(0),
                  "traits": {"email": "held@example.de"}},
                 {"type": "identify", "userId": "free", "messageId": "s1", "timestamp": at(0),
                  "traits": {"email": "free@example.de"}}]
THROUGH_ANOTHER_CUSTOMER = {
    "a cart named by both": [
        {"type": "track", "userId": "held", "event": "Product Added", "messageId": "a1", "timestamp": at(1),
         "properties": product("p1", cart_id="C1")},
        {"type": "track", "userId": "free", "event": "Product Added", "messageId": "a2", "timestamp": at(2),
         "properties": product("p2", cart_id="C1")}],
    "an order id sent for both": [
        {"type": "track", "userId": "held", "event": "Order Completed", "messageId": "b1", "timestamp": at(1),
         "properties": {"order_id": "O1", "total": 10}},
        {"type": "track", "userId": "free", "event": "Order Completed", "messageId": "b2", "timestamp": at(2),
         "properties": {"order_id": "O1", "total": 20}}],
    "a complaint answered by another": [
        {"type": "track", "userId": "held", "event": "Complaint Received", "messageId": "c1", "timestamp": at(1),
         "properties": {"complaint_id": "K1", "subject": "kaputt"}},
        {"type": "track", "userId": "free", "event": "Complaint Answered", "messageId": "c2", "timestamp": at(2),
         "properties": {"complaint_id": "K1"}}],
    "a shared mailbox unsubscribed, then merged": [
        {"type": "identify", "userId": "free", "messageId": "e0", "timestamp": at(1),
         "traits": {"email": "held@example.de", "marketing_consent": True, "consent_confirmed": True}},
        {"type": "page", "anonymousId": "guest", "name": "Home", "messageId": "e1", "timestamp": at(1)},
        {"type": "track", "userId": "held", "event": "Unsubscribed", "messageId": "e2", "timestamp": at(2)},
        {"type": "identify", "userId": "free", "anonymousId": "guest", "messageId": "e3", "timestamp": at(3),
         "traits": {}}],
}
STATE = """SELECT 'cart', c.external_id, cu.external_id, NULL FROM carts c JOIN customers cu ON cu.id = c.customer_id
UNION ALL SELECT 'order', o.external_id, cu.external_id, o.total_cents
  FROM orders o JOIN customers cu ON cu.id = o.customer_id
UNION ALL SELECT 'complaint', k.external_id, cu.external_id, CASE WHEN k.answered_at IS NULL THEN 0 ELSE 1 END
  FROM complaints k JOIN customers cu ON cu.id = k.customer_id
UNION ALL SELECT 'consent', external_id, email, CASE WHEN marketing_consent THEN 1 ELSE 0 END FROM customers
ORDER BY 1, 2"""


def identify(user: str, minute: float, message_id: str, **traits: Any) -> dict[str, Any]:
    return {"type": "identify", "userId": user, "messageId": message_id, "timestamp": at(minute), "traits": traits}


# Groups in which an alias, or an identify with both ids, makes two people one: from the
# group's first event on, what either does waits with what the other does.
MADE_ONE_IN_THE_GROUP: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {
    "a merge later in the group decides which cart is the latest open one": (
        [identify("held", 0, "s0", email="h@example.de"), identify("free", 0, "s1", email="f@example.de")],
        [{"type": "track", "userId": "held", "event": "Product Added", "messageId": "e0", "timestamp": at(1),
          "properties": product("p1")},
         {"type": "track", "userId": "free", "event": "Product Added", "messageId": "e1", "timestamp": at(2),
          "properties": product("p1")},
         {"type": "alias", "previousId": "held", "userId": "free", "messageId": "e2", "timestamp": at(3)},
         {"type": "track", "userId": "free", "event": "Product Added", "messageId": "e3", "timestamp": at(4),
          "properties": product("p2")}]),
    "an id made an alias unsubscribes a mailbox a held customer's event shares": (
        [identify("held", 0, "s0", email="s@example.de"), identify("free", 0, "s1", first_name="F")],
        [{"type": "alias", "previousId": "p", "userId": "free", "messageId": "e0", "timestamp": at(1)},
         {"type": "group", "userId": "held", "groupId": "g", "messageId": "e1", "timestamp": at(2), "traits": {}},
         identify("free", 3, "e2", email="s@example.de"),
         {"type": "track", "userId": "p", "event": "Unsubscribed", "messageId": "e3", "timestamp": at(4)}]),
    "an id made an alias asks for consent after its person was given the mailbox": (
        [identify("held", 0, "s0", email="s@example.de"), identify("free", 0, "s1", first_name="F")],
        [{"type": "alias", "previousId": "p", "userId": "free", "messageId": "e0", "timestamp": at(1)},
         {"type": "group", "userId": "held", "groupId": "g", "messageId": "e1", "timestamp": at(2), "traits": {}},
         identify("free", 3, "e2", email="s@example.de", marketing_consent=True),
         identify("p", 4, "e3", marketing_consent=True)]),
    "a guest claimed by identify gives its mailbox to the account": (
        [identify("held", 0, "s0", email="s1@bücher.de", marketing_consent=False)],
        [{"type": "identify", "userId": "g", "anonymousId": "f", "messageId": "e2", "timestamp": at(6),
          "traits": {}},
         {"type": "track", "userId": "held", "event": "Complaint Answered", "messageId": "e4", "timestamp": at(3),
          "properties": {"complaint_id": "k1"}},
         identify("f", 6, "e6", email="s1@bücher.de", marketing_consent=True, consent_confirmed=True),
         identify("g", 10, "e7", email="s1@example.de", marketing_consent=True)]),
}
EVERY_ROW = ("events", "customers", "customer_aliases", "carts", "cart_items", "orders", "complaints",
             "suppressions", "consent_changes", "customer_groups")


def loaded_while_held(engine: Engine, tmp_path: Path, setup: list[dict[str, Any]],
                      group_events: list[dict[str, Any]]) -> tuple[list[Any], list[Any], Engine]:
    """The group's outcomes loaded one event at a time (into a store of its own) and in one
    group while "held" is another writer's; and that store, to compare."""
    group = parsed(group_events)
    one_by_one = make_engine(f"sqlite:///{tmp_path / 'one-by-one.db'}")
    create_schema(one_by_one)
    for store in (one_by_one, engine):
        apply_events(store, parsed(setup))
    expected = [apply_events(one_by_one, [event]).outcomes[0] for event in group]
    with held_by_another_writer(engine, "held"):
        loader, result = loading(engine, group)
        loader.join(0.3)
    loader.join(30)
    return result[0].outcomes, expected, one_by_one


@pytest.mark.parametrize("case", sorted(THROUGH_ANOTHER_CUSTOMER))
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_events_that_meet_across_customers_wait_for_the_held_ones_before_them(engine: Engine, tmp_path: Path,
                                                                              case: str) -> None:
    outcomes, expected, one_by_one = loaded_while_held(engine, tmp_path, HELD_AND_FREE,
                                                       THROUGH_ANOTHER_CUSTOMER[case])
    assert outcomes == expected
    with one_by_one.connect() as left, engine.connect() as right:
        assert [tuple(row) for row in right.execute(text(STATE))] == [tuple(row) for row in left.execute(text(STATE))]


@pytest.mark.parametrize("case", sorted(MADE_ONE_IN_THE_GROUP))
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_people_an_alias_in_the_group_makes_one_wait_together_from_its_first_event(engine: Engine, tmp_path: Path,
                                                                                   case: str) -> None:
    setup, group_events = MADE_ONE_IN_THE_GROUP[case]
    outcomes, expected, one_by_one = loaded_while_held(engine, tmp_path, setup, group_events)
    assert outcomes == expected
    columns = {"events": ("message_id", "user_id", "type")}
    left, right = snapshot(one_by_one, columns["events"]), snapshot(engine, columns["events"])
    for table in EVERY_ROW:
        assert _comparable(right[table]) == _comparable(left[table]), table


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_an_event_waiting_for_a_customer_merged_away_meanwhile_lands_on_the_survivor(engine: Engine) -> None:
    """The other writer holds X while it merges X into Y (an alias): the event waiting for X is
    loaded, on Y, once the merge has committed; it is never left out."""
    apply_events(engine, parsed([{"type": "identify", "userId": name, "messageId": f"s-{name}", "timestamp": at(0),
                                  "traits": {"email": f"{name.lower()}@example.de"}} for name in ("X", "Y")]))
    merge = parsed([{"type": "alias", "previousId": "X", "userId": "Y", "messageId": "m1", "timestamp": at(1)}])
    with Session(writer(engine), expire_on_commit=False) as other:
        merging = _Store(other, exact=False)
        merging.prefetch(merge)  # X and Y locked, as a large group holds them while it loads
        loader, result = loading(engine, parsed([
            {"type": "page", "userId": "X", "name": "Home", "messageId": "p1", "timestamp": at(2)}]))
        loader.join(0.5)
        assert loader.is_alive()
        merging.apply(merge[0])
        merging.write_pending()
        other.commit()
    loader.join(30)
    assert result[0].outcomes == [None]
    with engine.connect() as connection:
        assert connection.execute(text("SELECT user_id FROM events WHERE message_id = 'p1'")).scalar_one() == "X"
        seen = connection.execute(text("SELECT external_id, last_seen_at FROM customers")).all()
    assert [name for name, _ in seen] == ["Y"] and seen[0][1] is not None


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_messageid_another_writer_commits_while_the_copy_waits_is_a_duplicate(engine: Engine) -> None:
    """The other writer's row is not yet committed when this group looks its messageIds up, so
    the event rows' COPY meets it at the unique key: a duplicate, once the other commits."""
    events = SQLModel.metadata.tables["events"]
    group = parsed([{"type": "page", "userId": "u1", "name": "Home", "messageId": "m1", "timestamp": at(1)},
                    {"type": "page", "userId": "u2", "name": "Home", "messageId": "m2", "timestamp": at(1)}])
    with engine.connect() as other, other.begin():
        other.execute(events.insert().values(message_id="m1", type="page", name="Home", user_id="u1",
                                             timestamp=BASE, payload={}, received_at=RECEIVED, source="other"))
        loader, result = loading(engine, group)
        loader.join(0.5)
        assert loader.is_alive()  # the COPY waits for the other writer's row
    loader.join(30)
    assert result[0].outcomes == [DUPLICATE, None]
    with engine.connect() as connection:
        assert dict(connection.execute(select(events.c.message_id, events.c.source)).all()) == {
            "m1": "other", "m2": "ingest"}


def _comparable(rows: list[dict[str, Any]]) -> list[str]:
    """Rows as text, times in UTC to the second (SQLite and PostgreSQL return them alike only so)."""
    def value(item: Any) -> Any:
        if isinstance(item, datetime):
            return (item if item.tzinfo else item.replace(tzinfo=UTC)).astimezone(UTC).isoformat(timespec="seconds")
        return item
    return sorted(json.dumps({k: value(v) for k, v in row.items()}, sort_keys=True, default=str) for row in rows)
