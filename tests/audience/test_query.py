"""Who is due for each kind of trigger, and why others are skipped."""

import threading
from datetime import timedelta
from typing import Any

from flows.audience.query import stream_candidates
from flows.kinds import KINDS
from flows.outcomes import Outcome
from flows.send.claims import Claim, claim
from flows.spec.project import load_project
from tests.support import ROOT
from tests.support.builders import NOW, Store, ago

RULES = load_project(ROOT / "triggers", ROOT / "templates").stages


def spec(kind: str, **fields: Any):
    data = {"name": f"t-{kind}", "description": "test", "kind": kind, "schedule": {"cron": "0 9 * * *"},
            "email": {"template": "winback", "subject": "Hi"}, **fields}
    return KINDS[kind].spec.model_validate(data, context={"stages": RULES.names})


def plan(store: Store, trigger, now=NOW, batch_size: int = 100) -> dict[int, Outcome | None]:
    batches = stream_candidates(store.engine, trigger, KINDS[trigger.kind], RULES, now, batch_size, "en")
    return {c.customer_id: c.skip for batch in batches for c in batch}


def test_abandoned_cart_wants_items_idle_long_enough_but_not_too_long_and_no_order_since(store: Store) -> None:
    due = store.customer("Due")
    store.cart(due, ago(hours=3))
    fresh = store.customer("Fresh")
    store.cart(fresh, ago(minutes=30))
    stale = store.customer("Stale")
    store.cart(stale, ago(days=4))
    empty = store.customer("Empty")
    store.cart(empty, ago(hours=3), items=[])
    bought = store.customer("Bought")
    store.cart(bought, ago(hours=5))
    store.order(bought, ago(hours=4))

    result = plan(store, spec("abandoned_cart", idle_for="2h", give_up_after="3d"))
    assert result == {due.id: None}


def test_a_changed_cart_is_a_new_occurrence(store: Store) -> None:
    customer = store.customer("Cara")
    cart = store.cart(customer, ago(hours=3))
    trigger = spec("abandoned_cart", idle_for="2h", reentry="every_occurrence")
    [first] = [c for batch in stream_candidates(store.engine, trigger, KINDS["abandoned_cart"], RULES, NOW, 10, "en")
               for c in batch]
    later = NOW + timedelta(hours=3)
    from sqlmodel import Session
    with Session(store.engine) as session:
        row = session.get(type(cart), cart.id)
        row.updated_at = NOW
        session.add(row)
        session.commit()
    [second] = [c for batch in stream_candidates(store.engine, trigger, KINDS["abandoned_cart"], RULES, later, 10, "en")
                for c in batch]
    assert first.send_key != second.send_key
    assert first.send_key.startswith(f"t-abandoned_cart/{customer.id}/cart:{cart.id}:")


def test_inactivity_counts_from_last_activity_within_the_window(store: Store) -> None:
    quiet = store.customer("Quiet", last_seen=ago(days=70))
    busy = store.customer("Busy", last_seen=ago(days=5))
    gone = store.customer("Gone", last_seen=ago(days=400))
    result = plan(store, spec("inactivity", inactive_for="60d", give_up_after="180d"))
    assert result == {quiet.id: None}
    assert busy.id not in result and gone.id not in result


def test_onboarding_day_n_with_a_catch_up_window(store: Store) -> None:
    day3 = store.customer("Tag3", created=ago(days=3, hours=2))
    day2 = store.customer("Tag2", created=ago(days=2))
    missed = store.customer("Alt", created=ago(days=6))
    result = plan(store, spec("onboarding", day=3, catch_up="2d"))
    assert result == {day3.id: None}
    assert day2.id not in result and missed.id not in result


def test_complaint_is_due_until_answered(store: Store) -> None:
    open_one = store.customer("Offen")
    store.complaint(open_one, ago(hours=1))
    answered = store.customer("Erledigt")
    store.complaint(answered, ago(hours=5), answered=ago(hours=2))
    too_old = store.customer("Alt")
    store.complaint(too_old, ago(days=10))
    no_consent = store.customer("Ohne", consent=False)
    store.complaint(no_consent, ago(hours=1))
    result = plan(store, spec("complaint", max_age="7d"))
    # Service mail: no marketing consent needed.
    assert result == {open_one.id: None, no_consent.id: None}


def test_campaign_targets_stages_once_per_slot_and_not_after_its_window(store: Store) -> None:
    lapsed = store.customer("Lars")
    store.order(lapsed, ago(days=500))
    active = store.customer("Ali")
    store.order(active, ago(days=5))
    store.order(active, ago(days=90))
    trigger = spec("campaign", schedule={"cron": "0 10 * * 1", "timezone": "Europe/Berlin"},
                   audience={"stages": ["lapsed"]}, send_window="1d")
    assert plan(store, trigger, NOW) == {lapsed.id: None}  # Monday 12:00 UTC, slot 09:00 UTC
    assert plan(store, trigger, NOW + timedelta(days=2)) == {}  # Wednesday: the window has passed
    keys = {c.send_key for b in stream_candidates(store.engine, trigger, KINDS["campaign"], RULES, NOW, 10, "en")
            for c in b}
    assert keys == {f"t-campaign/{lapsed.id}/slot:20260316T090000Z"}


def test_skip_reasons_consent_suppression_missing_email(store: Store) -> None:
    ok = store.customer("Ok", last_seen=ago(days=70))
    no_consent = store.customer("Nein", consent=False, last_seen=ago(days=70))
    suppressed = store.customer("Weg", last_seen=ago(days=70))
    store.suppress(suppressed.email.upper())
    no_email = store.customer("Leer", email=None, last_seen=ago(days=70))
    result = plan(store, spec("inactivity", inactive_for="60d"))
    assert result == {ok.id: None, no_consent.id: Outcome.NO_CONSENT, suppressed.id: Outcome.SUPPRESSED,
                      no_email.id: Outcome.NO_EMAIL}


def test_reentry_cooldown_and_already_sent(store: Store) -> None:
    customer = store.customer("Re", last_seen=ago(days=70))
    trigger = spec("inactivity", inactive_for="60d", reentry="90d")
    [candidate] = [c for b in stream_candidates(store.engine, trigger, KINDS["inactivity"], RULES, NOW, 10, "en")
                   for c in b]
    won = claim(store.engine, [Claim(candidate.send_key, trigger.name, customer.id, candidate.occurrence, "x", "t",
                                     customer.email, "<m@x>")], "run-1", NOW)
    assert won == {candidate.send_key}
    assert plan(store, trigger, NOW) == {customer.id: Outcome.ALREADY_SENT}
    # Activity makes a new occurrence; the cool-down still holds it back for 90 days.
    from sqlmodel import Session

    from models import Customer
    with Session(store.engine) as session:
        row = session.get(Customer, customer.id)
        row.last_seen_at = NOW + timedelta(days=1)
        session.add(row)
        session.commit()
    assert plan(store, trigger, NOW + timedelta(days=65)) == {customer.id: Outcome.REENTRY}
    assert plan(store, trigger, NOW + timedelta(days=95)) == {customer.id: None}


def test_audience_conditions_filter_in_sql(store: Store) -> None:
    de = store.customer("De", locale="de-AT", last_seen=ago(days=70))
    en = store.customer("En", locale="en-GB", last_seen=ago(days=70))
    store.order(en, ago(days=80))
    assert plan(store, spec("inactivity", inactive_for="60d", audience={"locales": ["de"]})) == {de.id: None}
    assert plan(store, spec("inactivity", inactive_for="60d", audience={"min_orders": 1})) == {en.id: None}


def test_large_audiences_stream_in_batches(store: Store) -> None:
    ids = [store.customer(f"K{i}", last_seen=ago(days=70)).id for i in range(25)]
    batches = list(stream_candidates(store.engine, spec("inactivity", inactive_for="60d"), KINDS["inactivity"],
                                     RULES, NOW, 10, "en"))
    assert [len(b) for b in batches] == [10, 10, 5]
    assert [c.customer_id for b in batches for c in b] == sorted(ids)


def test_a_stream_left_early_lets_go_of_its_reader(store: Store) -> None:
    for i in range(25):
        store.customer(f"K{i}", last_seen=ago(days=70))
    stream = stream_candidates(store.engine, spec("inactivity", inactive_for="60d"), KINDS["inactivity"],
                               RULES, NOW, 10, "en")
    assert len(next(stream)) == 10
    stream.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("audience-read")]
    assert store.engine.pool.checkedout() == 0


def test_each_occurrence_counts_the_customers_orders_once(store: Store) -> None:
    # Stage and order conditions aggregate the orders joined to each due row: a customer
    # due twice (two open carts) must not see her orders twice.
    customer = store.customer("Olga")
    for days, total in ((100, 40.0), (90, 50.0), (10, 60.0)):
        store.order(customer, ago(days=days), total=total)
    store.cart(customer, ago(hours=3))
    store.cart(customer, ago(hours=5))
    trigger = spec("abandoned_cart", idle_for="2h", reentry="every_occurrence",
                   audience={"max_orders": 3, "max_lifetime_value": 200, "stages": ["active"]})
    candidates = [c for b in stream_candidates(store.engine, trigger, KINDS["abandoned_cart"], RULES, NOW, 10, "en")
                  for c in b]
    assert [(c.customer_id, c.stage, c.skip) for c in candidates] == [(customer.id, "active", None)] * 2
    assert len({c.send_key for c in candidates}) == 2


def test_the_audience_is_read_without_jit_compilation_on_postgresql(store: Store) -> None:
    """PostgreSQL would compile each run's audience query anew for longer than it runs; only
    the audience's own transaction turns it off, the rest of the connection keeps the default."""
    from sqlalchemy import event

    due = store.customer("Due")
    store.cart(due, ago(hours=3))
    seen: list[tuple[int, str]] = []

    def statement(conn: Any, cursor: Any, sql: str, *args: Any) -> None:
        seen.append((id(conn.connection.dbapi_connection), sql))

    with store.engine.connect() as connection:
        default = connection.exec_driver_sql("SHOW jit").scalar() if store.engine.dialect.name == "postgresql" else ""
    event.listen(store.engine, "before_cursor_execute", statement)
    try:
        assert plan(store, spec("abandoned_cart", idle_for="2h")) == {due.id: None}
    finally:
        event.remove(store.engine, "before_cursor_execute", statement)
    audience = next((conn, sql) for conn, sql in seen if "AS reentry_blocked" in sql)
    off = [(conn, sql) for conn, sql in seen if sql == "SET LOCAL jit = off"]
    if store.engine.dialect.name == "postgresql":
        assert off and off[0][0] == audience[0] and seen.index(off[0]) < seen.index(audience)
        with store.engine.connect() as connection:
            assert connection.exec_driver_sql("SHOW jit").scalar() == default
    else:
        assert off == []
