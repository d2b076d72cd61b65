"""Last-touch attribution: which mail an order goes to, stored once, the same incrementally as rebuilt."""

import random
from datetime import datetime, timedelta
from itertools import count
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, func, insert, select
from sqlmodel import Session, col

from flows.analysis.attribution import AttributionTally, attribute
from flows.spec.policy import Attribution as AttributionPolicy
from models import Attribution, Customer, Engagement, Order, Send, StoreMeta
from tests.support.builders import NOW, Store

DEFAULT = AttributionPolicy()  # click or delivery, 5 days
_keys = count(1)


def execute(target: Engine | Connection, statement: Any) -> Any:
    """``statement`` in its own transaction on an engine, or in the connection's open one; its one value."""
    if isinstance(target, Connection):
        result = target.execute(statement)
        return result.scalar() if result.returns_rows else None
    with target.begin() as connection:
        return execute(connection, statement)


def send(engine: Engine | Connection, customer: Customer, at: datetime, *, status: str = "sent",
         trigger: str = "winback", category: str = "marketing", stage: str = "lapsed") -> int:
    """A ledger row for a mail to ``customer`` at ``at`` (its moment, ``evaluated_at``); its id."""
    n = next(_keys)
    return execute(engine, insert(Send).values(
            send_key=f"{trigger}/{customer.id}/{n}", trigger=trigger, customer_id=customer.id, occurrence=str(n),
            category=category, status=status, run_id="run", stage=stage, template=f"{trigger}/default.de.html.j2",
            email=customer.email, message_id=f"<{n:032x}@shop.example>", evaluated_at=at, claimed_at=at,
    ).returning(col(Send.id)))


def engage(engine: Engine | Connection, send_id: int, customer: Customer, at: datetime, *, kind: str = "click",
           machine: str = "") -> None:
    execute(engine, insert(Engagement).values(send_id=send_id, customer_id=customer.id, kind=kind,
                                              link=0 if kind == "click" else -1, at=at, machine=machine))


def order(engine: Engine | Connection, customer: Customer, placed: datetime, cents: int = 5000,
          currency: str = "EUR") -> int:
    return execute(engine, insert(Order).values(
        external_id=f"o-{next(_keys)}", customer_id=customer.id, placed_at=placed, total_cents=cents,
        currency=currency, products=[]).returning(col(Order.id)))


def rows(engine: Engine) -> dict[int, tuple]:
    """order id → (send id, basis, touched at, trigger, stage, template, total, currency)."""
    with Session(engine) as session:
        return {a.order_id: (a.send_id, a.basis, a.touched_at, a.trigger, a.stage, a.template, a.total_cents,
                             a.currency)
                for a in session.execute(select(Attribution)).scalars()}


def of(engine: Engine, order_id: int) -> tuple[int | None, str]:
    send_id, basis, *_ = rows(engine)[order_id]
    return send_id, basis


def test_an_order_goes_to_the_mail_clicked_before_it_with_the_sends_trigger_stage_and_template(store, engine):
    anna = store.customer()
    mail = send(engine, anna, NOW - timedelta(days=3), trigger="abandoned-cart", stage="active")
    engage(engine, mail, anna, NOW - timedelta(days=2))
    bought = order(engine, anna, NOW - timedelta(days=1), cents=12990, currency="USD")

    tally = attribute(engine, DEFAULT, NOW)

    assert tally == AttributionTally(orders_seen=1, attributed=1, unattributed=0, by_basis={"click": 1})
    assert rows(engine)[bought] == (mail, "click", NOW - timedelta(days=2), "abandoned-cart", "active",
                                    "abandoned-cart/default.de.html.j2", 12990, "USD")


def test_the_latest_touch_wins_whether_click_or_delivery(store, engine):
    anna, ben = store.customer("Anna"), store.customer("Ben")
    clicked = send(engine, anna, NOW - timedelta(days=4))
    engage(engine, clicked, anna, NOW - timedelta(days=3))
    delivered_later = send(engine, anna, NOW - timedelta(days=2))
    annas = order(engine, anna, NOW - timedelta(days=1))
    delivered = send(engine, ben, NOW - timedelta(days=4))
    clicked_later = send(engine, ben, NOW - timedelta(days=4, hours=1))
    engage(engine, clicked_later, ben, NOW - timedelta(days=2))
    bens = order(engine, ben, NOW - timedelta(days=1))

    attribute(engine, DEFAULT, NOW)

    assert of(engine, annas) == (delivered_later, "delivery")
    assert of(engine, bens) == (clicked_later, "click")
    assert delivered != clicked_later


def test_on_a_tie_a_click_beats_a_delivery_and_then_the_newer_send_wins(store, engine):
    anna, ben = store.customer("Anna"), store.customer("Ben")
    moment = NOW - timedelta(days=2)
    first = send(engine, anna, moment - timedelta(hours=1))
    delivered_then = send(engine, anna, moment)
    engage(engine, first, anna, moment)
    annas = order(engine, anna, NOW)
    older = send(engine, ben, moment)
    newer = send(engine, ben, moment)
    bens = order(engine, ben, NOW)

    attribute(engine, DEFAULT, NOW)

    assert of(engine, annas) == (first, "click") and delivered_then != first
    assert of(engine, bens) == (newer, "delivery") and older < newer


def test_the_window_holds_both_of_its_ends_to_the_microsecond(store, engine):
    window = timedelta(days=5)
    placed = NOW + timedelta(microseconds=999_700)  # a fraction SQLite's own date functions would round
    edge, outside, at_order = store.customer("Edge"), store.customer("Outside"), store.customer("AtOrder")
    on_edge = send(engine, edge, placed - window)
    send(engine, outside, placed - window - timedelta(microseconds=1))
    at_once = send(engine, at_order, placed)
    after = store.customer("After")
    send(engine, after, placed + timedelta(microseconds=1))
    orders = {name: order(engine, who, placed) for name, who in
              (("edge", edge), ("outside", outside), ("at", at_order), ("after", after))}

    attribute(engine, DEFAULT, placed)

    assert of(engine, orders["edge"]) == (on_edge, "delivery")
    assert of(engine, orders["outside"]) == (None, "")
    assert of(engine, orders["at"]) == (at_once, "delivery")
    assert of(engine, orders["after"]) == (None, "")


def test_machine_clicks_service_mail_undelivered_mail_and_other_customers_mail_are_no_touch(store, engine):
    anna, ben = store.customer("Anna"), store.customer("Ben")
    at = NOW - timedelta(days=1)
    scanned = send(engine, anna, at, status="bounced")
    for machine in ("head", "scanner", "too_soon"):
        engage(engine, scanned, anna, at, machine=machine)
    receipt = send(engine, anna, at, category="transactional")
    engage(engine, receipt, anna, at)
    for status in ("held_out", "failed", "bounced", "deferred", "expired", "claimed", "sending"):
        send(engine, anna, at, status=status)
    send(engine, ben, at)
    annas = order(engine, anna, NOW)

    tally = attribute(engine, DEFAULT, NOW)

    assert of(engine, annas) == (None, "")
    assert (tally.attributed, tally.unattributed) == (0, 1)


def test_a_complained_send_was_delivered(store, engine):
    anna = store.customer()
    complained = send(engine, anna, NOW - timedelta(days=1), status="complained")
    annas = order(engine, anna, NOW)

    attribute(engine, DEFAULT, NOW)

    assert of(engine, annas) == (complained, "delivery")


def test_the_basis_and_the_window_are_the_policys(store, engine):
    anna = store.customer()
    delivered = send(engine, anna, NOW - timedelta(days=1))
    opened = send(engine, anna, NOW - timedelta(days=6))
    engage(engine, opened, anna, NOW - timedelta(hours=12), kind="open")
    annas = order(engine, anna, NOW)

    attribute(engine, AttributionPolicy(basis=["click"]), NOW)
    assert of(engine, annas) == (None, "")
    attribute(engine, AttributionPolicy(basis=["delivery", "open"]), NOW, rebuild=True)
    assert of(engine, annas) == (opened, "open")
    attribute(engine, DEFAULT, NOW, rebuild=True)
    assert of(engine, annas) == (delivered, "delivery")
    attribute(engine, AttributionPolicy(window=timedelta(hours=2)), NOW, rebuild=True)
    assert of(engine, annas) == (None, "")


def test_an_order_without_a_send_is_stored_unattributed_and_never_lost(store, engine):
    walk_in = store.customer()
    bought = order(engine, walk_in, NOW - timedelta(hours=3), cents=990)

    tally = attribute(engine, DEFAULT, NOW)

    assert tally == AttributionTally(orders_seen=1, attributed=0, unattributed=1, by_basis={})
    assert rows(engine)[bought] == (None, "", None, None, "", "", 990, "EUR")


def test_an_incremental_run_attributes_only_orders_it_has_not_seen_and_only_those_placed_by_now(store, engine):
    anna = store.customer()
    mail = send(engine, anna, NOW - timedelta(days=2))
    earlier = order(engine, anna, NOW - timedelta(days=1))
    later = order(engine, anna, NOW + timedelta(days=1))

    assert attribute(engine, DEFAULT, NOW).orders_seen == 1
    assert set(rows(engine)) == {earlier}
    assert attribute(engine, DEFAULT, NOW).orders_seen == 0
    assert attribute(engine, DEFAULT, NOW + timedelta(days=1)) == AttributionTally(1, 1, 0, {"delivery": 1})
    assert of(engine, later) == (mail, "delivery")


def test_a_rebuild_as_of_an_earlier_moment_recomputes_the_orders_by_then_and_keeps_the_later_rows(store, engine):
    anna = store.customer()
    early = send(engine, anna, NOW - timedelta(days=3))
    first = order(engine, anna, NOW - timedelta(days=2))
    late = send(engine, anna, NOW - timedelta(hours=2))
    second = order(engine, anna, NOW)
    attribute(engine, DEFAULT, NOW)
    with engine.begin() as connection:  # the earlier send bounced since: no longer a delivery
        connection.execute(Send.__table__.update().where(col(Send.id) == early).values(status="bounced"))

    tally = attribute(engine, DEFAULT, NOW - timedelta(days=1), rebuild=True)

    assert tally == AttributionTally(orders_seen=1, attributed=0, unattributed=1, by_basis={})
    assert of(engine, first) == (None, "") and of(engine, second) == (late, "delivery")


def test_time_travel_counts_no_send_or_click_after_the_moment(store, engine):
    anna = store.customer()
    order_at = NOW - timedelta(days=1)
    early = send(engine, anna, NOW - timedelta(days=3))
    annas = order(engine, anna, order_at)
    late = send(engine, anna, NOW - timedelta(hours=1))
    engage(engine, late, anna, NOW - timedelta(minutes=30))

    attribute(engine, DEFAULT, order_at)

    assert of(engine, annas) == (early, "delivery")


# A month of a living store, day by day: the rule, written out plainly, is the oracle.
class Month:
    def __init__(self, store: Store, seed: int) -> None:
        self.store, self.engine, self.random = store, store.engine, random.Random(seed)
        self.start = NOW - timedelta(days=30)
        self.customers = [store.customer(f"K{i}") for i in range(40)]
        self.sends: list[tuple[int, int, datetime, str, str]] = []  # id, customer, moment, status, category
        self.clicks: list[tuple[int, int, datetime, str, str]] = []  # send, customer, at, kind, machine
        self.orders: list[tuple[int, int, datetime]] = []

    def day(self, n: int) -> datetime:
        """Day ``n``'s sends, clicks and orders, at random moments in it (microseconds too); its end."""
        begin, rnd = self.start + timedelta(days=n), self.random
        with self.engine.begin() as connection:
            self._day(connection, begin, rnd)
        return begin + timedelta(days=1)

    def _day(self, connection: Connection, begin: datetime, rnd: random.Random) -> None:
        for customer in self.customers:
            if rnd.random() < 0.3:
                at = begin + timedelta(seconds=rnd.uniform(0, 86_400))
                status = rnd.choice(["sent"] * 6 + ["bounced", "complained", "held_out", "failed"])
                category = "marketing" if rnd.random() < 0.9 else "transactional"
                send_id = send(connection, customer, at, status=status, category=category,
                               trigger=rnd.choice(["winback", "abandoned-cart"]))
                self.sends.append((send_id, customer.id, at, status, category))
            mine = [s for s in self.sends
                    if s[1] == customer.id and s[3] != "held_out" and s[2] >= begin - timedelta(days=8)]
            if mine and rnd.random() < 0.3:
                clicked = rnd.choice(mine)
                at = max(clicked[2], begin) + timedelta(seconds=rnd.uniform(0, 20_000))
                kind = "click" if rnd.random() < 0.8 else "open"
                machine = rnd.choice(["", "", "", "scanner"])
                engage(connection, clicked[0], customer, at, kind=kind, machine=machine)
                self.clicks.append((clicked[0], customer.id, at, kind, machine))
            if rnd.random() < 0.15:
                placed = begin + timedelta(seconds=rnd.uniform(0, 86_400))
                self.orders.append((order(connection, customer, placed), customer.id, placed))

    def expected(self, policy: AttributionPolicy, now: datetime, clicks_since: datetime | None = None) -> dict:
        """order id → (send id, basis) by the rule, counting clicks at or after ``clicks_since``."""
        rank = {"click": 0, "open": 1, "delivery": 2}
        category_of = {send_id: category for send_id, *_, category in self.sends}
        result = {}
        for order_id, customer, placed in self.orders:
            if placed > now:
                continue
            touches = []
            if "delivery" in policy.basis:
                touches += [(at, "delivery", send_id) for send_id, who, at, status, category in self.sends
                            if who == customer and category == "marketing" and status in ("sent", "complained")]
            for send_id, who, at, kind, machine in self.clicks:
                if (who == customer and kind in policy.basis and not machine and category_of[send_id] == "marketing"
                        and (clicks_since is None or at >= clicks_since)):
                    touches.append((at, kind, send_id))
            touches = [t for t in touches if placed - policy.window <= t[0] <= placed]
            best = max(touches, key=lambda t: (t[0], -rank[t[1]], t[2]), default=None)
            result[order_id] = (best[2], best[1]) if best else (None, "")
        return result


@pytest.mark.parametrize("policy", [DEFAULT, AttributionPolicy(window=timedelta(days=2), basis=["click", "open"])],
                         ids=["click-or-delivery-5d", "click-or-open-2d"])
def test_daily_incremental_runs_over_a_month_give_exactly_the_rows_of_one_rebuild_and_of_the_rule(store, engine,
                                                                                                 policy):
    month = Month(store, seed=16)
    for n in range(30):
        end = month.day(n)
        attribute(engine, policy, end)
    incremental = rows(engine)

    tally = attribute(engine, policy, end, rebuild=True)

    assert rows(engine) == incremental
    assert tally.orders_seen == len(month.orders) == len(incremental) > 50
    assert {order_id: row[:2] for order_id, row in incremental.items()} == month.expected(policy, end)
    assert tally.attributed > 10 and tally.unattributed > 10  # both kinds of row were exercised


def test_after_old_clicks_are_deleted_a_rebuild_keeps_the_older_rows_and_still_equals_the_daily_runs(store, engine):
    month, keep_for = Month(store, seed=7), timedelta(days=10)
    deleted = 0
    for n in range(30):
        end = month.day(n)
        deleted += attribute(engine, DEFAULT, end, keep_for=keep_for).deleted_engagements
    incremental = rows(engine)
    with Session(engine) as session:
        oldest = session.execute(select(func.min(col(Engagement.at)))).scalar_one()
        kept_since = session.get(StoreMeta, "engagements_kept_since")
    clicks_kept_since = end - keep_for

    assert deleted == sum(1 for c in month.clicks if c[2] < clicks_kept_since) > 0
    assert oldest >= clicks_kept_since and kept_since is not None
    for again in (attribute(engine, DEFAULT, end, rebuild=True),
                  attribute(engine, DEFAULT, end, rebuild=True, keep_for=keep_for)):
        assert rows(engine) == incremental
        recomputed = sum(1 for _, _, placed in month.orders if placed >= clicks_kept_since + DEFAULT.window)
        assert again.orders_seen == recomputed < len(month.orders)
    # A rebuild of everything with the clicks that are left would have lost some click attributions:
    without_old_clicks = month.expected(DEFAULT, end, clicks_since=clicks_kept_since)
    assert {o: r[:2] for o, r in incremental.items()} == month.expected(DEFAULT, end) != without_old_clicks


def test_a_run_as_of_a_later_moment_deletes_no_click_the_real_clock_still_keeps(store, engine):
    """Retention goes by the real clock: "as of next year" is a question, not a reason to delete today's clicks."""
    from models.types import utcnow

    anna = store.customer("Anna")
    today = utcnow()
    mail = send(engine, anna, today - timedelta(hours=2))
    engage(engine, mail, anna, today - timedelta(hours=1))
    tally = attribute(engine, DEFAULT, today + timedelta(days=500), keep_for=timedelta(days=400))
    assert tally.deleted_engagements == 0
    with Session(engine) as session:
        assert session.execute(select(func.count()).select_from(Engagement)).scalar_one() == 1
        kept = session.get(StoreMeta, "engagements_kept_since")
        assert kept is not None and datetime.fromisoformat(kept.value) <= utcnow() - timedelta(days=400)
