"""The report: each figure per trigger, stage, template and variant follows from a hand-made
ledger (sends in every status, clicks by people and machines, stored attributions)."""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta

import pytest

from flows.analysis.attribution import attribute
from flows.analysis.holdouts import lift_by_trigger
from flows.analysis.report import SCHEMA, build_report, holdouts_meanwhile, revenue_over_time
from flows.spec.policy import Policy
from models import Send
from tests.support.builders import NOW, Store, ago
from tests.support.outcomes import Outcomes

SINCE, UNTIL = ago(days=30), NOW
CART, WINBACK = "abandoned-cart", "winback-lapsed"
DE, LOYAL_EN = "abandoned_cart/default.de.html.j2", "abandoned_cart/loyal.en.html.j2"


@dataclass
class Ledger:
    clicked: Send  # cart, new: a person clicked (three times), one order
    scanned: Send  # cart, new: only a scanner clicked, two orders on delivery
    complained: Send  # cart, loyal: delivered, then reported as spam
    bounced: Send  # cart, loyal
    winback: Send  # winback, lapsed: clicked, orders in EUR and USD
    opened: Send  # winback, lapsed: opened by a person, no click


@pytest.fixture
def ledger(store: Store) -> Ledger:
    o = Outcomes(store)
    people = [store.customer(name) for name in ("A", "B", "C", "D", "E", "F", "G", "H", "I", "J", "K", "L")]
    a, b, c, d, e, f, g, h, i, j, k, m = people
    clicked = o.send(a, CART, ago(days=10), stage="new", template=DE)
    for n in range(3):  # one person's three clicks: one unique click
        o.click(clicked, ago(days=10) + timedelta(hours=1, minutes=n))
    o.converted(clicked, ago(days=9), total=100.0)
    scanned = o.send(b, CART, ago(days=9), stage="new", template=DE)
    o.click(scanned, ago(days=9) + timedelta(seconds=2), machine="scanner")
    o.converted(scanned, ago(days=8), total=40.0, basis="delivery")
    o.converted(scanned, ago(days=7), total=10.0, basis="delivery")
    complained = o.send(c, CART, ago(days=8), "complained", stage="loyal", template=LOYAL_EN)
    bounced = o.send(d, CART, ago(days=7), "bounced", stage="loyal", template=LOYAL_EN)
    before = o.send(e, CART, ago(days=40), stage="loyal", template=LOYAL_EN)  # before the period: not counted
    o.click(before, ago(days=40) + timedelta(hours=2))
    o.converted(before, ago(days=39), total=999.0)
    o.send(f, CART, ago(days=6), "failed", stage="new", template=DE, error="550 no such user")
    o.send(g, CART, ago(days=6), "held_out", stage="new", template=DE)
    o.send(g, "complaint-ack", ago(days=5), category="transactional", template="complaint/default.de.html.j2")
    winback = o.send(h, WINBACK, ago(days=5), stage="lapsed", template="winback/default.de.html.j2")
    o.click(winback, ago(days=5) + timedelta(hours=3))
    o.converted(winback, ago(days=4), total=30.0, currency="USD")
    o.converted(winback, ago(days=3), total=20.0, currency="EUR", basis="delivery")
    opened = o.send(i, WINBACK, ago(days=5), stage="lapsed", template="winback/default.de.html.j2")
    o.open(opened, ago(days=4))
    o.open(opened, ago(days=4), machine="too_soon")
    o.attributed(o.order(j, ago(days=2), total=12.0), None)  # no touch in the window: unattributed
    o.attributed(o.order(k, ago(days=2), total=5.0, currency="GBP"), None)
    o.attributed(o.order(k, ago(days=45), total=7.0), None)  # before the period
    o.order(m, ago(days=1), total=8.0)  # not looked at by the attribution yet
    return Ledger(clicked, scanned, complained, bounced, winback, opened)


def report(store: Store, **kwargs: object):
    return build_report(store.engine, since=SINCE, until=UNTIL, policy=Policy(), **kwargs)


def test_per_trigger_every_figure_follows_from_the_ledger(store: Store, ledger: Ledger) -> None:
    found = report(store)
    assert found.triggers == [CART, WINBACK]  # marketing only: the transactional acknowledgement is not a row
    cart = found.row(CART)
    assert cart is not None
    assert cart.delivered == 3  # clicked and scanned (sent), complained; not bounced, failed, held out, or before
    assert cart.bounced == 1
    assert cart.unique_clicks == 1  # three clicks by a person on one mail; a scanner's is no click
    assert cart.click_rate == pytest.approx(1 / 3)
    assert (cart.conversions, cart.converted_sends) == (3, 2)  # 1 + 2 orders, on two mails
    assert cart.conversion_rate == pytest.approx(2 / 3)
    assert cart.revenue == {"EUR": 10000 + 4000 + 1000}
    assert cart.revenue_per_recipient == {"EUR": pytest.approx(15000 / 3, abs=0.01)}
    assert cart.opens == 0
    winback = found.row(WINBACK)
    assert winback is not None
    assert (winback.delivered, winback.unique_clicks, winback.conversions, winback.converted_sends) == (2, 1, 2, 1)
    assert winback.opens == 1  # a person's; the machine's open is not counted
    assert not found.opens_reliable


def test_currencies_are_kept_apart_never_summed(store: Store, ledger: Ledger) -> None:
    winback = report(store).row(WINBACK)
    assert winback is not None
    assert winback.revenue == {"EUR": 2000, "USD": 3000}
    assert winback.revenue_per_recipient == {"EUR": 1000.0, "USD": 1500.0}


def test_stage_template_and_variant_rows_add_up_to_their_trigger(store: Store, ledger: Ledger) -> None:
    found = report(store)
    new, loyal = found.row(CART, "stage", "new"), found.row(CART, "stage", "loyal")
    assert new is not None and loyal is not None
    assert (new.delivered, new.bounced, new.unique_clicks, new.conversions) == (2, 0, 1, 3)
    assert (loyal.delivered, loyal.bounced, loyal.unique_clicks, loyal.conversions) == (1, 1, 0, 0)
    assert [r.value for r in found.rows_of("template") if r.trigger == CART] == ["abandoned_cart"]  # the folder
    assert [r.value for r in found.rows_of("variant")] == ["", ""]  # mails of no experiment: the default one
    for trigger in found.triggers:
        whole = found.row(trigger)
        assert whole is not None
        for dimension in ("stage", "template", "variant"):
            parts = [r for r in found.rows_of(dimension) if r.trigger == trigger]
            assert sum(r.delivered for r in parts) == whole.delivered
            assert sum(r.unique_clicks for r in parts) == whole.unique_clicks
            assert sum(r.conversions for r in parts) == whole.conversions


def test_unattributed_orders_are_shown_not_lost(store: Store, ledger: Ledger) -> None:
    found = report(store).unattributed
    assert found.orders == 2 and found.revenue == {"EUR": 1200, "GBP": 500}  # J and K's in the period
    assert found.pending == 1  # M's order: no attribution row yet


def test_triggers_filter_and_a_past_now_leaves_later_facts_out(store: Store, ledger: Ledger) -> None:
    only = report(store, triggers=[WINBACK])
    assert only.triggers == [WINBACK]
    earlier = report(store, now=ago(days=8, hours=12))  # after the first order, before the scanned mail's
    cart = earlier.row(CART)
    assert cart is not None and (cart.conversions, cart.revenue) == (1, {"EUR": 10000})


def test_holdout_lifts_are_those_of_the_holdout_analysis(store: Store, ledger: Ledger) -> None:
    found = report(store)
    expected = lift_by_trigger(store.engine, since=SINCE, until=UNTIL, window=Policy().attribution.window)
    assert found.holdouts == expected
    assert {lift.trigger for lift in found.holdouts} == {CART}  # only it has a held-out row
    line = next(line for line in found.lines() if line.startswith(CART))
    assert found.holdouts[0].verdict in line


def test_the_holdout_comparison_reads_no_attribution_so_it_may_start_before_the_orders_are_attributed(
        store: Store, ledger: Ledger) -> None:
    """``lifecycle report`` starts it, then attributes the new orders, then builds the rest."""
    o = Outcomes(store)
    held, treated = store.customer("held"), store.customer("treated")
    o.send(held, CART, ago(days=3), "held_out", stage="new", template=DE)
    o.order(held, ago(days=2), total=70.0)  # neither is attributed yet
    o.order(treated, ago(days=2), total=15.0)
    policy = Policy()
    with ThreadPoolExecutor(max_workers=1) as pool:
        early = holdouts_meanwhile(pool, store.engine, since=SINCE, until=UNTIL, policy=policy, now=NOW,
                                   effect=0.03)
        early_lifts = early.result()
        attribute(store.engine, policy.attribution, NOW)
        found = report(store, now=NOW, effect=0.03, holdouts=early)
    assert found.holdouts == early_lifts == report(store, now=NOW, effect=0.03).holdouts
    assert found.holdouts != report(store, now=NOW).holdouts  # another effect, another sample size
    assert found.rows == report(store, now=NOW).rows
    [cart] = found.holdouts
    assert cart.held_out.conversions == 1


def test_json_has_the_documented_schema(store: Store, ledger: Ledger) -> None:
    import json

    data = json.loads(json.dumps(report(store).to_json(), allow_nan=False))
    assert data["schema"] == SCHEMA
    assert set(data) == {"schema", "period", "attribution", "opens_reliable", "opens_note", "rows", "unattributed",
                         "holdouts", "summary"}
    assert data["period"] == {"since": SINCE.isoformat(), "until": UNTIL.isoformat()}
    assert data["attribution"] == {"window_seconds": 5 * 86400, "basis": ["click", "delivery"]}
    row = next(r for r in data["rows"] if r["trigger"] == WINBACK and r["dimension"] == "trigger")
    assert set(row) == {"trigger", "dimension", "value", "delivered", "bounced", "unique_clicks", "click_rate", "opens",
                        "conversions", "converted_sends", "conversion_rate", "revenue", "revenue_per_recipient"}
    assert row["revenue"] == {"EUR": 2000, "USD": 3000} and row["click_rate"] == 0.5
    assert data["unattributed"] == {"orders": 2, "revenue": {"EUR": 1200, "GBP": 500}, "pending": 1}


def test_csv_rows_share_one_header_with_a_column_per_currency(store: Store, ledger: Ledger) -> None:
    rows = report(store).to_rows()
    assert len({tuple(r) for r in rows}) == 1  # the same columns in every row
    assert {"revenue_cents_EUR", "revenue_cents_USD", "revenue_cents_GBP"} <= set(rows[0])
    winback = next(r for r in rows if r["trigger"] == WINBACK and r["dimension"] == "trigger")
    assert (winback["revenue_cents_EUR"], winback["revenue_cents_USD"], winback["revenue_cents_GBP"]) == (2000, 3000, 0)
    last = rows[-1]
    assert last["dimension"] == "unattributed" and last["conversions"] == 2 and last["revenue_cents_GBP"] == 500


def test_an_empty_period_reports_no_rows_and_no_rates(store: Store, ledger: Ledger) -> None:
    found = build_report(store.engine, since=ago(days=400), until=ago(days=300), policy=Policy())
    assert found.rows == [] and found.holdouts == [] and found.unattributed.orders == 0
    assert found.to_rows()[-1]["dimension"] == "unattributed"


def test_revenue_over_time_buckets_attributed_revenue_by_week_per_currency(store: Store, ledger: Ledger) -> None:
    series = revenue_over_time(store.engine, since=ago(days=14), until=NOW, bucket_days=7)
    assert list(series) == [CART, WINBACK]
    cart, winback = series[CART], series[WINBACK]
    assert [start for start, _ in cart] == [ago(days=14), ago(days=7)]  # every bucket, empty ones too
    # The cart's orders on days -9 and -8 fall in the first week, the one on day -7 in the second.
    assert [amounts for _, amounts in cart] == [{"EUR": 14000}, {"EUR": 1000}]
    assert [amounts for _, amounts in winback] == [{}, {"USD": 3000, "EUR": 2000}]
