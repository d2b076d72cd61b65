"""Ingest: Segment events into the store, idempotent, bad lines reported by number."""

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select, text
from sqlmodel import Session
from typer.testing import CliRunner

from flows.ingest import ingest_lines
from flows.settings import Settings
from flows.surfaces.cli import app
from models import (
    Cart,
    CartItem,
    CategoryOptOut,
    Complaint,
    Customer,
    CustomerAlias,
    Event,
    GroupMembership,
    Order,
    Send,
    Suppression,
)
from tests.support import FIXTURES


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
        line(type="capture", userId="u5", timestamp="2026-03-02T10:00:00Z"),
        line(type="page", timestamp="2026-03-02T10:00:00Z", name="Home"),
        line(type="group", userId="u5", timestamp="2026-03-02T10:00:00Z", traits={"name": "Acme"}),
        line(type="track", userId="u5", event="Page Viewed"),
        EVENTS[4],
    ]
    report = ingest_lines(engine, lines)
    assert report.loaded == 2
    errors = dict(report.errors)
    assert sorted(errors) == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert "not valid JSON" in errors[2]
    assert errors[3].startswith("properties.price: ")
    assert errors[4].startswith("timestamp: ")
    assert errors[5].startswith("traits.email: not a deliverable address")
    assert errors[6] == "previousId: alias calls need the previous id"
    assert errors[7].startswith("type: Input should be 'identify', 'track', 'page', 'screen', 'group' or 'alias'")
    assert errors[8] == "userId: required, or anonymousId for a visitor not yet identified"
    assert errors[9] == "groupId: group calls need the group's id"
    assert errors[10] == "timestamp: required (or originalTimestamp, receivedAt)"


def test_events_without_a_message_id_are_still_deduplicated(engine) -> None:
    plain = line(type="track", userId="u9", event="Page Viewed", timestamp="2026-03-02T10:00:00Z")
    assert ingest_lines(engine, [plain, plain]).duplicates == 1
    assert ingest_lines(engine, [plain]).duplicates == 1


# -- the whole Segment spec --------------------------------------------------------------

def customer(engine: Engine, external_id: str) -> Customer | None:
    with Session(engine) as session:
        return session.execute(select(Customer).where(Customer.external_id == external_id)).scalar_one_or_none()


def test_page_and_screen_calls_count_as_activity(engine) -> None:
    report = ingest_lines(engine, [
        line(type="identify", userId="u1", timestamp="2026-03-01T10:00:00Z", traits={"email": "a@example.de"}),
        line(type="page", userId="u1", timestamp="2026-03-02T10:00:00Z", name="Sale",
             properties={"url": "https://shop.example/sale", "path": "/sale", "referrer": "", "title": "Sale"}),
        line(type="screen", userId="u1", timestamp="2026-03-03T10:00:00Z", name="Cart"),
    ])
    assert (report.loaded, report.errors) == (3, [])
    assert customer(engine, "u1").last_seen_at.isoformat() == "2026-03-03T10:00:00+00:00"
    with Session(engine) as session:
        assert [(e.type, e.name) for e in session.execute(select(Event).order_by(Event.id)).scalars()] == [
            ("identify", None), ("page", "Sale"), ("screen", "Cart")]


def test_group_calls_record_the_membership_with_the_newest_group_traits(engine) -> None:
    report = ingest_lines(engine, [
        line(type="group", userId="u1", groupId="acme", timestamp="2026-03-02T10:00:00Z",
             traits={"name": "Acme", "plan": "basic", "email": "not an address: a group's trait, not ours"}),
        line(type="group", userId="u1", groupId="acme", timestamp="2026-03-04T10:00:00Z", traits={"plan": "pro"}),
        line(type="group", userId="u1", groupId="acme", timestamp="2026-03-03T10:00:00Z", traits={"plan": "late"}),
    ])
    assert (report.loaded, report.errors) == (3, [])
    with Session(engine) as session:
        [membership] = session.execute(select(GroupMembership)).scalars().all()
        assert membership.group_id == "acme" and membership.traits["plan"] == "pro"
        assert membership.traits["name"] == "Acme"
        assert session.execute(select(func.count()).select_from(Event).where(Event.type == "group")).scalar_one() == 3
    assert customer(engine, "u1").last_seen_at is None  # joining a group is not activity


def test_an_event_with_only_an_anonymous_id_belongs_to_a_guest_keyed_by_it(engine) -> None:
    report = ingest_lines(engine, [
        line(type="page", anonymousId="anon-1", timestamp="2026-03-02T10:00:00Z", name="Home"),
        line(type="track", anonymousId="anon-1", event="Product Added", timestamp="2026-03-02T10:01:00Z",
             properties={"product_id": "p1", "price": 10}),
    ])
    assert (report.loaded, report.errors) == (2, [])
    guest = customer(engine, "anon-1")
    assert guest is not None and guest.email is None
    with Session(engine) as session:
        assert session.execute(select(Cart.customer_id)).scalar_one() == guest.id


@pytest.mark.parametrize(("text", "at"), [
    ('{"type": "track", "userId": "u1"\n', None),        # cut short at the end of its line (was: column 1)
    ('{"type": "track", "userId": "u1"\r\n', None),
    ('    {"type": "track", "userId": }\n', "}"),         # leading whitespace counts
    ('{"name": "Jürgen Groß", "x": nope}\n', "nope"),     # characters, not bytes (ü and ß are two bytes each)
])
def test_a_json_error_names_its_line_and_the_1_based_column(engine, text: str, at: str | None) -> None:
    report = ingest_lines(engine, [EVENTS[0], text])
    [(number, reason)] = report.errors
    assert number == 2
    content = text.rstrip("\r\n")
    column = content.index(at) + 1 if at else len(content) + 1  # where the next character was expected
    assert reason.startswith("not valid JSON (") and reason.endswith(f" at column {column})"), reason


def test_a_byte_order_mark_before_the_first_line_is_not_an_error(settings: Settings, engine, tmp_path: Path) -> None:
    report = ingest_lines(engine, ["\ufeff" + EVENTS[0], EVENTS[1]])
    assert (report.loaded, report.errors) == (2, [])
    saved = tmp_path / "bom.jsonl"
    saved.write_bytes(b"\xef\xbb\xbf" + "\n".join(EVENTS[2:4]).encode())  # as a Windows editor saves it
    result = CliRunner().invoke(app, ["ingest", str(saved)])
    assert result.exit_code == 0 and "Loaded 2 event(s)" in result.output, result.output


def test_a_line_that_is_not_utf_8_is_one_bad_line(settings: Settings, tmp_path: Path) -> None:
    events = tmp_path / "latin1.jsonl"
    latin1 = '{"type": "identify", "userId": "Jürgen"}'
    events.write_bytes(EVENTS[0].encode() + b"\n" + latin1.encode("latin-1") + b"\n" + EVENTS[4].encode() + b"\n")
    result = CliRunner(env={"COLUMNS": "250"}).invoke(app, ["ingest", str(events)])
    assert result.exit_code == 1
    assert f"{events}:2: not UTF-8 (byte 0xfc at column {latin1.index('ü') + 1})" in result.output
    assert "Loaded 2 event(s), 0 already known, 1 bad line(s) skipped." in result.output


def test_a_real_segment_export_loads_with_the_cli_and_exits_0(settings: Settings, engine) -> None:
    export = FIXTURES / "segment_export.jsonl"
    result = CliRunner().invoke(app, ["ingest", str(export)])
    assert result.exit_code == 0, result.output
    assert "Loaded 10 event(s), 0 already known, 0 bad line(s) skipped." in result.output
    with Session(engine) as session:
        types = sorted(set(session.execute(select(Event.type)).scalars()))
        assert types == ["alias", "group", "identify", "page", "screen", "track"]
        jana = session.execute(select(Customer).where(Customer.external_id == "u-1001")).scalar_one()
        assert (jana.email, jana.locale, jana.consent_requested_at is not None) == (
            "Jana.Weber@example.de", "de-DE", True)
        guest = "4d1f7c2e-8b9a-4e61-9d0c-3f5b2a1e7c90"  # browsed and filled a cart before identifying
        assert session.execute(select(Customer).where(Customer.external_id == guest)).scalar_one_or_none() is None
        assert session.get(CustomerAlias, guest).customer_id == jana.id
        assert session.get(CustomerAlias, "guest-7f3c").customer_id == jana.id
        assert session.execute(select(Cart.customer_id)).scalar_one() == jana.id
        assert session.execute(select(Order.customer_id)).scalar_one() == jana.id
        assert session.get(GroupMembership, (jana.id, "grp-wanderclub-koeln")).traits["employees"] == 12
        assert jana.last_seen_at.isoformat() == "2026-03-03T10:15:00+00:00"
    again = CliRunner().invoke(app, ["ingest", str(export)])
    assert again.exit_code == 0 and "Loaded 0 event(s), 10 already known" in again.output


# -- one mailbox, one customer ---------------------------------------------------------

def identify(user: str, ts: str, message: str, **traits: object) -> str:
    return line(type="identify", userId=user, timestamp=ts, messageId=message, traits=traits)


PAT_AS_GUEST = identify("guest-1", "2026-03-01T10:00:00Z", "g1", email="pat@example.com", first_name="Pat",
                        locale="fr-FR", marketing_consent=True, consent_confirmed=True,
                        createdAt="2026-01-01T00:00:00Z")
PAT_AS_ACCOUNT = identify("acct-9", "2026-03-05T10:00:00Z", "a1", email="Pat@Example.com", last_name="Lee",
                          createdAt="2026-03-05T00:00:00Z")
PAT_MERGED = line(type="alias", previousId="guest-1", userId="acct-9", timestamp="2026-03-06T10:00:00Z",
                  messageId="al1")


def test_customers_sharing_an_address_are_reported_by_ingest_and_the_cli(settings: Settings, engine,
                                                                         tmp_path: Path) -> None:
    report = ingest_lines(engine, [PAT_AS_GUEST, PAT_AS_ACCOUNT])
    assert [(s.address, s.customers) for s in report.shared] == [("pat@example.com", ["acct-9", "guest-1"])]
    events = tmp_path / "more.jsonl"
    events.write_text(identify("acct-9", "2026-03-07T10:00:00Z", "a2", first_name="Pat") + "\n")
    result = CliRunner(env={"COLUMNS": "250"}).invoke(app, ["ingest", str(events)])
    assert result.exit_code == 0, result.output
    assert ("pat@example.com is shared by customers acct-9, guest-1: send an alias event to merge them"
            in result.output)


def _history(engine: Engine, guest: Customer) -> None:
    """Everything a guest can have that points at them: an order, a cart, a complaint, an opt-out, a send."""
    when = datetime(2026, 3, 2, tzinfo=UTC)
    with Session(engine) as session:
        session.add(Order(external_id="o-1", customer_id=guest.id, placed_at=when, total_cents=100, currency="EUR"))
        session.add(Cart(external_id="c-1", customer_id=guest.id, created_at=when, updated_at=when))
        session.add(Complaint(external_id="k-1", customer_id=guest.id, subject="Kaputt", received_at=when))
        session.add(CategoryOptOut(customer_id=guest.id, category="campaign"))
        session.add(Send(send_key=f"winback-lapsed/{guest.id}/2026-03-02", trigger="winback-lapsed",
                         customer_id=guest.id, occurrence="2026-03-02", status="sent", run_id="r1",
                         email="pat@example.com", evaluated_at=when, claimed_at=when))
        session.commit()


def test_alias_merges_the_previous_customer_and_everything_that_points_at_it(engine) -> None:
    ingest_lines(engine, [PAT_AS_GUEST, PAT_AS_ACCOUNT])
    guest = customer(engine, "guest-1")
    _history(engine, guest)
    ingest_lines(engine, [line(type="track", userId="guest-1", event="Page Viewed", timestamp="2026-03-04T10:00:00Z")])
    with Session(engine) as session:
        session.add(CategoryOptOut(customer_id=customer(engine, "acct-9").id, category="campaign"))  # both left it
        session.commit()
    report = ingest_lines(engine, [PAT_MERGED])
    assert (report.loaded, report.errors, report.merged, report.shared) == (1, [], 1, [])
    assert customer(engine, "guest-1") is None
    pat = customer(engine, "acct-9")
    assert (pat.email, pat.first_name, pat.last_name, pat.locale) == ("Pat@example.com", "Pat", "Lee", "fr-FR")
    assert pat.created_at.isoformat() == "2026-01-01T00:00:00+00:00"  # the earliest
    assert pat.last_seen_at.isoformat() == "2026-03-04T10:00:00+00:00"  # the latest
    assert pat.marketing_consent is True  # the guest's confirmed consent, never withdrawn
    with Session(engine) as session:
        for model in (Order, Cart, Complaint, CategoryOptOut, Send):
            assert set(session.execute(select(model.customer_id)).scalars()) == {pat.id}, model
        assert session.execute(select(func.count()).select_from(CategoryOptOut)).scalar_one() == 1
        assert session.get(CustomerAlias, "guest-1").customer_id == pat.id
    # A late event for the guest's id lands on the account; no new record appears.
    later = ingest_lines(engine, [identify("guest-1", "2026-03-08T10:00:00Z", "g2", first_name="Patricia")])
    assert later.errors == [] and customer(engine, "guest-1") is None
    assert customer(engine, "acct-9").first_name == "Patricia"


def test_merging_is_idempotent(engine) -> None:
    ingest_lines(engine, [PAT_AS_GUEST, PAT_AS_ACCOUNT, PAT_MERGED])
    with Session(engine) as session:
        before = [session.execute(select(func.count()).select_from(m)).scalar_one()
                  for m in (Customer, CustomerAlias, Event)]
    again = ingest_lines(engine, [PAT_MERGED])
    assert (again.loaded, again.duplicates) == (0, 1)
    repeated = ingest_lines(engine, [PAT_MERGED.replace('"al1"', '"al2"')])  # the same alias, sent again
    assert (repeated.loaded, repeated.errors, repeated.merged) == (1, [], 0)
    with Session(engine) as session:
        after = [session.execute(select(func.count()).select_from(m)).scalar_one()
                 for m in (Customer, CustomerAlias, Event)]
    assert after == [before[0], before[1], before[2] + 1]


@pytest.mark.parametrize("who_withdrew", ["guest-1", "acct-9"])
def test_a_withdrawal_on_either_record_survives_the_merge(engine, who_withdrew: str) -> None:
    confirmed = {"marketing_consent": True, "consent_confirmed": True}
    ingest_lines(engine, [
        identify("guest-1", "2026-03-01T10:00:00Z", "g1", email="pat@example.com", **confirmed),
        identify("acct-9", "2026-03-02T10:00:00Z", "a1", email="pat@example.com", **confirmed),
        identify(who_withdrew, "2026-03-03T10:00:00Z", "w1", marketing_consent=False),
        PAT_MERGED,
    ])
    pat = customer(engine, "acct-9")
    assert pat.marketing_consent is False and pat.consent_at is None
    assert pat.consent_withdrawn_at.isoformat() == "2026-03-03T10:00:00+00:00"


def test_an_unsubscribe_suppressing_the_guest_s_other_address_withdraws_the_merged_consent(engine) -> None:
    ingest_lines(engine, [
        identify("guest-1", "2026-03-01T10:00:00Z", "g1", email="pat.old@example.com"),
        identify("acct-9", "2026-03-02T10:00:00Z", "a1", email="pat@example.com", marketing_consent=True,
                 consent_confirmed=True),
    ])
    with Session(engine) as session:  # as `lifecycle web` records an unsubscribe: only a suppression
        session.add(Suppression(email="pat.old@example.com", reason="unsubscribed"))
        session.commit()
    ingest_lines(engine, [PAT_MERGED])
    pat = customer(engine, "acct-9")
    assert (pat.email, pat.marketing_consent) == ("pat@example.com", False)


def test_an_alias_for_an_unknown_previous_id_records_the_link(engine) -> None:
    report = ingest_lines(engine, [
        line(type="alias", previousId="anon-7", userId="u7", timestamp="2026-03-01T10:00:00Z"),
        line(type="page", anonymousId="anon-7", timestamp="2026-03-02T10:00:00Z", name="Home"),
    ])
    assert (report.loaded, report.errors, report.merged) == (2, [], 0)
    assert customer(engine, "anon-7") is None
    assert customer(engine, "u7").last_seen_at.isoformat() == "2026-03-02T10:00:00+00:00"


def test_an_identify_with_both_ids_turns_the_guest_into_the_account(engine) -> None:
    report = ingest_lines(engine, [
        line(type="track", anonymousId="anon-1", event="Product Added", timestamp="2026-03-02T10:00:00Z",
             properties={"product_id": "p1", "price": 10}),
        line(type="identify", anonymousId="anon-1", userId="u1", timestamp="2026-03-02T10:05:00Z",
             traits={"email": "kim@example.de"}),
        line(type="identify", anonymousId="anon-1", userId="u2", timestamp="2026-03-03T10:05:00Z",
             traits={"email": "sibling@example.de"}),  # the same browser, another account: no merge
    ])
    assert (report.loaded, report.errors, report.merged) == (3, [], 1)
    kim, sibling = customer(engine, "u1"), customer(engine, "u2")
    assert customer(engine, "anon-1") is None and kim.email == "kim@example.de"
    assert sibling is not None and sibling.email == "sibling@example.de"
    with Session(engine) as session:
        assert session.execute(select(Cart.customer_id)).scalar_one() == kim.id
        assert session.get(CustomerAlias, "anon-1").customer_id == kim.id


def _refuse_deleting(engine: Engine, external_id: str) -> None:
    """A database trigger that refuses to delete one customer: the merge fails at its last step."""
    with engine.begin() as connection:
        if engine.dialect.name == "sqlite":
            connection.execute(text(
                f"CREATE TRIGGER keep BEFORE DELETE ON customers WHEN old.external_id = '{external_id}' "
                "BEGIN SELECT RAISE(ABORT, 'kept by the test'); END"))
        else:
            connection.execute(text(
                "CREATE FUNCTION keep() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                f"IF old.external_id = '{external_id}' THEN RAISE EXCEPTION 'kept by the test' "
                "USING ERRCODE = 'integrity_constraint_violation'; END IF; RETURN old; END $$"))
            connection.execute(text("CREATE TRIGGER keep BEFORE DELETE ON customers FOR EACH ROW "
                                    "EXECUTE FUNCTION keep()"))


def test_a_merge_that_fails_changes_nothing_and_the_next_lines_still_load(engine) -> None:
    ingest_lines(engine, [PAT_AS_GUEST, PAT_AS_ACCOUNT])
    guest = customer(engine, "guest-1")
    _history(engine, guest)
    _refuse_deleting(engine, "guest-1")
    try:
        report = ingest_lines(engine, [PAT_MERGED, identify("acct-9", "2026-03-09T10:00:00Z", "a3", first_name="P.")])
        assert report.loaded == 1 and [n for n, _ in report.errors] == [1]
        assert "kept by the test" in report.errors[0][1]
        assert customer(engine, "guest-1") is not None
        with Session(engine) as session:
            for model in (Order, Cart, Complaint, CategoryOptOut, Send):
                assert set(session.execute(select(model.customer_id)).scalars()) == {guest.id}, model
            assert session.get(CustomerAlias, "guest-1") is None
            assert session.execute(select(Event).where(Event.message_id == "al1")).first() is None
        assert customer(engine, "acct-9").first_name == "P."
    finally:
        with engine.begin() as connection:
            connection.execute(text("DROP TRIGGER keep" if engine.dialect.name == "sqlite" else
                                    "DROP TRIGGER keep ON customers"))
            if engine.dialect.name != "sqlite":
                connection.execute(text("DROP FUNCTION keep()"))


# -- hostile input ------------------------------------------------------------------------

def _track(name: str, message: str, properties: object, **envelope: object) -> str:
    return line(type="track", userId="h1", event=name, messageId=message, properties=properties,
                **({"timestamp": "2026-03-02T10:00:00Z"} | envelope))


def _deep(levels: int) -> str:
    return ('{"type": "track", "userId": "h1", "event": "Deep", "timestamp": "2026-03-02T10:00:00Z", '
            '"properties": {"a": ' + "[" * levels + "]" * levels + "}}")


HOSTILE = [  # (line, what its reason says)
    (('{"type": "track", "userId": "h1", "event": "Product Added", "timestamp": "2026-03-02T10:00:00Z", '
      '"properties": {"product_id": "p1", "price": Infinity}}'), "not valid JSON (Infinity is not a JSON number)"),
    (('{"type": "track", "userId": "h1", "event": "Order Completed", "timestamp": "2026-03-02T10:00:00Z", '
      '"properties": {"order_id": "o-nan", "total": NaN}}'), "not valid JSON (NaN is not a JSON number)"),
    ('{"type": "page", "userId": "h1", "timestamp": "2026-03-02T10:00:00Z", "context": {"x": -Infinity}}',
     "not valid JSON (-Infinity is not a JSON number)"),
    ('{"type": "page", "userId": "h1", "timestamp": "2026-03-02T10:00:00Z", "context": {"x": 1e400}}',
     "not valid JSON (1e400 is beyond the range of a JSON number)"),
    ('{"type": "page", "userId": "h1", "timestamp": "2026-03-02T10:00:00Z", "context": {"x": ' + "9" * 5000 + "}}",
     "not valid JSON (a number of more than 4300 digits)"),
    (_track("Product Added", "q30", {"product_id": "p1", "quantity": 1e30}), "properties.quantity: "),
    (_track("Product Added", "qint", {"product_id": "p1", "quantity": 10**30}), "properties.quantity: "),
    (_track("Product Added", "p300", {"product_id": "p1", "price": 1e300}), "properties.price: "),
    (_track("Order Completed", "t308", {"order_id": "o-1", "total": 1e308}), "properties.total: "),
    (_track("Order Completed", "r308", {"order_id": "o-2", "revenue": "1e308"}), "properties.revenue: "),
    (_track("Product Added", "subcent", {"product_id": "p1", "price": 0.285}),
     "properties.price: Decimal input should have no more than 2 decimal places"),
    (_track("Order Completed", "cur", {"order_id": "o-3", "total": 1, "currency": "€€€"}),
     "properties.currency: String should match pattern"),
    (_track("Product Added", "url", {"product_id": "p1", "url": "https://shop.example/" + "x" * 2000}),
     "properties.url: String should have at most 2000 characters"),
    (_deep(1000), "nested deeper than 32 levels"),
    (_deep(33), "nested deeper than 32 levels"),
    (_track("Page Viewed", "ts1", {}, timestamp="0001-01-01T00:00:00+14:00"), "timestamp: before 1970"),
    (_track("Page Viewed", "ts2", {}, timestamp="9999-12-31T23:59:59-14:00"),
     "timestamp: more than a day in the future"),
    (_track("Page Viewed", "ts3", {}, timestamp="1969-12-31T23:59:59Z"), "timestamp: before 1970"),
    (_track("Page Viewed", "ts4", {}, timestamp=5), "timestamp: a number is not a moment"),
    (_track("Page Viewed", "ts5", {}, timestamp="2026-03-02T10:00:00"), "timestamp: no time zone"),
    (_track("Page Viewed", "ts6", {}, timestamp="2026-03-02"), "timestamp: no time zone"),
    (_track("Page Viewed", "ts7", {}, timestamp=None, receivedAt=1772445600000),
     "receivedAt: a number is not a moment"),
    (line(type="identify", userId="h2", timestamp="2026-03-02T10:00:00Z", messageId="ca",
          traits={"createdAt": "0001-01-01T00:00:00+14:00"}), "traits.createdAt: before 1970"),
    (line(type="identify", userId="h2", timestamp="2026-03-02T10:00:00Z", messageId="nul",
          traits={"first_name": "Eve\u0000"}), "traits.first_name: a NUL character"),
    (('{"type": "identify", "userId": "h2", "timestamp": "2026-03-02T10:00:00Z", "traits": '
      '{"first_name": "\\ud800"}}'), "not valid Unicode (a lone surrogate \\ud800 in traits.first_name)"),
]


def test_a_hostile_line_is_one_bad_line_and_every_other_line_loads(engine) -> None:
    lines = []
    for number, (hostile, _) in enumerate(HOSTILE):
        lines += [line(type="page", userId="h1", timestamp="2026-03-01T10:00:00Z", messageId=f"ok{number}",
                       name="Home"), hostile]
    lines.append(line(type="page", userId="h1", timestamp="2026-03-01T10:00:00Z", messageId="last", name="Home"))
    report = ingest_lines(engine, lines)
    assert [number for number, _ in report.errors] == list(range(2, 2 * len(HOSTILE) + 1, 2)), report.errors
    for (number, reason), (_, expected) in zip(report.errors, HOSTILE, strict=True):
        assert reason.startswith(expected), (number, reason, expected)
    assert report.loaded == len(HOSTILE) + 1
    with Session(engine) as session:
        assert count(session, Event) == len(HOSTILE) + 1
        assert (count(session, CartItem), count(session, Order)) == (0, 0)


def test_amounts_are_stored_exactly_in_cents(engine) -> None:
    report = ingest_lines(engine, [
        _track("Product Added", "a1", {"product_id": "p1", "price": 1000000, "quantity": 10000}),
        _track("Product Added", "a2", {"product_id": "p2", "price": "0.10"}),
        _track("Product Added", "a3", {"product_id": "p3", "price": 19.99}),
        _track("Product Added", "a4", {"product_id": "p1", "price": 1000000}),  # the cart would hold 10,001
        _track("Order Completed", "a5", {"order_id": "o-1", "total": 9999999.99}),
        _track("Order Completed", "a6", {"order_id": "o-2", "revenue": 0.29}),
    ])
    assert [n for n, _ in report.errors] == [4] and "more than 10000" in report.errors[0][1], report.errors
    with Session(engine) as session:
        items = {i.product_id: (i.quantity, i.price_cents) for i in session.execute(select(CartItem)).scalars()}
        assert items == {"p1": (10000, 100000000), "p2": (1, 10), "p3": (1, 1999)}
        totals = dict(session.execute(select(Order.external_id, Order.total_cents)).all())
        assert totals == {"o-1": 999999999, "o-2": 29}


def _refuse_value(engine: Engine, product_id: str) -> None:
    """A database trigger that refuses one value the way each database does (PostgreSQL: a data exception)."""
    with engine.begin() as connection:
        if engine.dialect.name == "sqlite":
            connection.execute(text(
                f"CREATE TRIGGER refuse BEFORE INSERT ON cart_items WHEN new.product_id = '{product_id}' "
                "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"))
        else:
            connection.execute(text(
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                f"IF new.product_id = '{product_id}' THEN RAISE EXCEPTION 'refused by the test' "
                "USING ERRCODE = 'numeric_value_out_of_range'; END IF; RETURN new; END $$"))
            connection.execute(text("CREATE TRIGGER refuse BEFORE INSERT ON cart_items FOR EACH ROW "
                                    "EXECUTE FUNCTION refuse()"))


def test_a_value_the_database_refuses_fails_its_line_only(engine) -> None:
    _refuse_value(engine, "refused")
    try:
        lines = [_track("Product Added", f"v{n}", {"product_id": "refused" if n == 3 else f"p{n}", "price": 1})
                 for n in range(1, 8)]
        report = ingest_lines(engine, lines)
        assert [n for n, _ in report.errors] == [3] and "refused by the test" in report.errors[0][1], report.errors
        assert report.loaded == 6
        with Session(engine) as session:
            assert sorted(session.execute(select(CartItem.product_id)).scalars()) == ["p1", "p2", "p4", "p5", "p6",
                                                                                      "p7"]
            assert count(session, Event) == 6
    finally:
        with engine.begin() as connection:
            connection.execute(text("DROP TRIGGER refuse" if engine.dialect.name == "sqlite" else
                                    "DROP TRIGGER refuse ON cart_items"))
            if engine.dialect.name != "sqlite":
                connection.execute(text("DROP FUNCTION refuse()"))


# -- internationalised addresses -----------------------------------------------------------

def test_an_idn_address_is_stored_with_its_ascii_domain_and_is_one_mailbox_in_either_form(engine) -> None:
    report = ingest_lines(engine, [
        identify("u1", "2026-03-01T10:00:00Z", "i1", email="kunde@xn--bcher-kva.de"),
        identify("u2", "2026-03-02T10:00:00Z", "i2", email="Kunde@Bücher.DE"),
        line(type="track", userId="u2", event="Unsubscribed", timestamp="2026-03-03T10:00:00Z", messageId="i3"),
    ])
    assert (report.loaded, report.errors) == (3, [])
    assert customer(engine, "u1").email == "kunde@xn--bcher-kva.de"  # as the envelope needs it
    assert customer(engine, "u2").email == "Kunde@xn--bcher-kva.de"
    assert [(s.address, s.customers) for s in report.shared] == [("kunde@xn--bcher-kva.de", ["u1", "u2"])]
    with Session(engine) as session:
        assert session.get(Suppression, "kunde@xn--bcher-kva.de") is not None  # suppresses both records
        suppressed = session.execute(select(Customer.external_id).join(
            Suppression, Suppression.email == func.lower(Customer.email))).scalars()
        assert sorted(suppressed) == ["u1", "u2"]


def test_a_non_ascii_local_part_is_accepted_and_one_mailbox_whatever_its_case(engine) -> None:
    report = ingest_lines(engine, [
        identify("u1", "2026-03-01T10:00:00Z", "j1", email="Jürgen@Bücher.de"),
        identify("u2", "2026-03-02T10:00:00Z", "j2", email="JÜRGEN@bücher.DE"),
    ])
    assert (report.loaded, report.errors) == (2, [])
    # Lower-cased when it is not ASCII: SQLite's lower() leaves Ü as it is, Python's and
    # PostgreSQL's do not, and the suppressions and the ledger's unique index must agree.
    assert customer(engine, "u1").email == customer(engine, "u2").email == "jürgen@xn--bcher-kva.de"
    assert [(s.address, s.customers) for s in report.shared] == [("jürgen@xn--bcher-kva.de", ["u1", "u2"])]
    with Session(engine) as session:
        assert set(session.execute(select(func.lower(Customer.email))).scalars()) == {"jürgen@xn--bcher-kva.de"}


def test_a_store_holding_unicode_domains_upgrades_to_ascii_ones(db_url: str) -> None:
    """Before 0007 ingest stored ``kunde@bücher.de``: 0007 rewrites the domain wherever an
    address is kept, and a suppression in either form keeps suppressing."""
    from models.db import make_engine
    from models.migrate import upgrade

    engine = make_engine(db_url)
    upgrade(engine, "0006")
    with engine.begin() as connection:
        for n, email in ((1, "kunde@bücher.de"), (2, "Jürgen@Bücher.de"), (3, "plain@example.de")):
            connection.execute(text("INSERT INTO customers (id, external_id, email, locale, marketing_consent, "
                                    "created_at) VALUES (:n, :x, :e, 'en', true, '2026-01-01')"),
                               {"n": n, "x": f"c-{n}", "e": email})
        for email in ("kunde@bücher.de", "kunde@xn--bcher-kva.de", "jürgen@bücher.de"):
            connection.execute(text("INSERT INTO suppressions (email, reason, detail, created_at) "
                                    "VALUES (:e, 'manual', '', '2026-01-01')"), {"e": email})
        connection.execute(text("INSERT INTO sends (send_key, trigger, customer_id, occurrence, category, status, "
                                "run_id, stage, template, email, message_id, evaluated_at, claimed_at, smtp_reply, "
                                "error) VALUES ('w/1/slot:1', 'w', 1, 'slot:1', 'marketing', 'deferred', 'r', "
                                "'lapsed', 't', 'kunde@bücher.de', '', '2026-01-01', '2026-01-01', '', '')"))
    upgrade(engine)
    with engine.connect() as connection:
        emails = connection.execute(text("SELECT email FROM customers ORDER BY id")).scalars().all()
        suppressed = connection.execute(text("SELECT email FROM suppressions ORDER BY email")).scalars().all()
        sends = connection.execute(text("SELECT email FROM sends")).scalars().all()
    assert emails == ["kunde@xn--bcher-kva.de", "jürgen@xn--bcher-kva.de", "plain@example.de"]
    assert suppressed == ["jürgen@xn--bcher-kva.de", "kunde@xn--bcher-kva.de"]
    assert sends == ["kunde@xn--bcher-kva.de"]
    engine.dispose()


def test_an_identify_reads_traits_from_context_too_as_rudderstack_sends_them() -> None:
    """RudderStack's libraries put identify's traits in ``context.traits`` only; the event's own win."""
    from flows.ingest import parse_line

    base = {"type": "identify", "userId": "r1", "timestamp": "2026-03-02T10:00:00Z", "messageId": "r-1"}
    only_context = parse_line(json.dumps({**base, "context": {"traits": {"email": "Ada@Shop.example",
                                                                         "first_name": "Ada"}}}))
    assert only_context.traits is not None
    assert (only_context.traits.email, only_context.traits.first_name) == ("Ada@shop.example", "Ada")
    both = parse_line(json.dumps({**base, "traits": {"first_name": "Grace"},
                                  "context": {"traits": {"email": "ada@shop.example", "first_name": "Ada"}}}))
    assert both.traits is not None and (both.traits.email, both.traits.first_name) == ("ada@shop.example", "Grace")
    with pytest.raises(ValueError, match=r"^context\.traits\.email: not a deliverable address"):
        parse_line(json.dumps({**base, "context": {"traits": {"email": "not-an-address"}}}))
