"""Stage analytics: the stage counts at each week's end, who moved where, and each stage's KPIs,
against customers whose stages are known by construction (the shipped rules)."""

from datetime import UTC, date, datetime, timedelta

import pytest
import yaml

from flows.analysis.stages import JOINED, distribution, end_of, stage_kpis, stages_at, transitions, week_ends
from flows.audience.stage_sql import customer_stages
from flows.spec.stages import StageRules
from models import Customer
from tests.support import ROOT
from tests.support.builders import Store
from tests.support.outcomes import Outcomes

RULES = StageRules.model_validate(yaml.safe_load((ROOT / "triggers" / "stages.yaml").read_text()))
START, END = date(2026, 3, 1), date(2026, 3, 15)  # two Sundays
M0, M1 = end_of(START), end_of(END)  # read as of Monday 00:00 UTC
LONG_AGO = datetime(2024, 1, 1, tzinfo=UTC)


@pytest.fixture
def cast(store: Store) -> dict[str, Customer]:
    """Customers whose stage at the ends of START and END follow from the shipped rules
    (prospect: no order; lapsed: none for 365 days; at_risk: none for 120; loyal: 5 orders;
    new: first within 60 days; active: the rest), by name."""
    made: dict[str, Customer] = {}

    def customer(name: str, *orders: datetime, created: datetime = LONG_AGO, total: float = 50.0) -> None:
        made[name] = store.customer(name, created=created)
        for placed in orders:
            store.order(made[name], placed, total=total)

    customer("prospect")  # never orders
    customer("new", M0 - timedelta(days=10))  # new at both: first order 10, then 24 days before
    customer("at_risk", M0 - timedelta(days=130))  # 130, then 144 days: at_risk at both
    customer("active_to_at_risk", M0 - timedelta(days=115))  # 115 days: active; 129 days: at_risk
    customer("prospect_to_new", M0 + timedelta(days=3), total=30.0)  # no order at START, a first one by END
    customer("joined", created=M0 + timedelta(days=1))  # signed up between the two
    customer("loyal", *(M0 - timedelta(days=20 + n) for n in range(5)))
    customer("lapsed", M0 - timedelta(days=400))
    # A profile made after END whose imported orders predate START: a customer all along.
    customer("imported_history", M0 - timedelta(days=400), created=M1 + timedelta(days=30))
    return made


def test_week_ends_are_the_sundays_of_the_period() -> None:
    assert week_ends(date(2026, 2, 25), date(2026, 3, 15)) == [date(2026, 3, 1), date(2026, 3, 8), date(2026, 3, 15)]
    assert all(d.weekday() == 6 for d in week_ends(date(2026, 1, 1), date(2026, 6, 30)))
    assert week_ends(date(2026, 3, 2), date(2026, 3, 7)) == []


def test_distribution_counts_each_stage_at_each_date_s_end(store: Store, cast: dict[str, Customer]) -> None:
    (first, at_start), (second, at_end) = distribution(store.engine, RULES, [START, END])
    assert (first, second) == (START, END)
    assert list(at_start) == RULES.names  # every stage, in the rules' order, empty ones as 0
    assert at_start == {"prospect": 2, "lapsed": 2, "at_risk": 1, "loyal": 1, "new": 1, "active": 1}
    assert at_end == {"prospect": 2, "lapsed": 2, "at_risk": 2, "loyal": 1, "new": 2, "active": 0}
    # Nobody counted who did not exist yet ("joined" signed up after START).
    assert sum(at_start.values()) == len(cast) - 1 and sum(at_end.values()) == len(cast)


def test_stages_are_the_runs_own_stages(store: Store, cast: dict[str, Customer]) -> None:
    """The same rules compiled the same way: each customer's stage equals the audience query's."""
    with store.engine.connect() as connection:
        ours = {cid: stage for cid, stage, _ in connection.execute(stages_at(RULES, M1))}
        runs = dict(connection.execute(customer_stages(RULES, M1)).all())
    assert ours == {cid: runs[cid] for cid in ours}


def test_transitions_say_who_moved_from_which_stage_to_which(store: Store, cast: dict[str, Customer]) -> None:
    matrix = transitions(store.engine, RULES, START, END)
    assert list(matrix) == [JOINED, *RULES.names] and all(list(row) == RULES.names for row in matrix.values())
    moved = {(a, b): n for a, row in matrix.items() for b, n in row.items() if n}
    assert moved == {
        ("prospect", "prospect"): 1,
        ("prospect", "new"): 1,  # prospect_to_new
        (JOINED, "prospect"): 1,  # joined
        ("new", "new"): 1,
        ("at_risk", "at_risk"): 1,
        ("active", "at_risk"): 1,  # active_to_at_risk
        ("loyal", "loyal"): 1,
        ("lapsed", "lapsed"): 2,  # lapsed, and imported_history (its orders predate its profile)
    }


def test_stage_kpis_follow_each_stage_s_customers_through_the_period(store: Store, cast: dict[str, Customer]) -> None:
    outcomes = Outcomes(store)
    new, loyal = cast["new"], cast["loyal"]
    outcomes.order(new, M0 + timedelta(days=2), total=20.0, currency="EUR")
    outcomes.order(new, M0 + timedelta(days=4), total=12.0, currency="USD")
    outcomes.order(loyal, M0 + timedelta(days=5), total=80.0)
    clicked = outcomes.send(new, "abandoned-cart", M0 + timedelta(days=1))
    outcomes.click(clicked, M0 + timedelta(days=1, hours=1))
    scanned = outcomes.send(new, "abandoned-cart", M0 + timedelta(days=6))
    outcomes.click(scanned, M0 + timedelta(days=6), machine="scanner")
    outcomes.send(new, "abandoned-cart", M0 + timedelta(days=7), "bounced")  # not delivered

    kpis = {k.stage: k for k in stage_kpis(store.engine, RULES, M0, M1)}
    assert list(kpis) == RULES.names
    prospect = kpis["prospect"]  # prospect and prospect_to_new (joined came later: not in the cohort)
    assert (prospect.customers, prospect.purchasers, prospect.orders) == (2, 1, 1)
    assert prospect.conversion_rate == 0.5 and prospect.repeat_purchase_rate == 0.0  # a first order
    assert prospect.average_order_value == {"EUR": 3000.0} and prospect.purchase_frequency == 1.0
    fresh = kpis["new"]  # two orders in two currencies, after an earlier one
    assert (fresh.customers, fresh.purchasers, fresh.orders, fresh.repeat_purchase_rate) == (1, 1, 2, 1.0)
    assert fresh.average_order_value == {"EUR": 2000.0, "USD": 1200.0}  # never averaged across currencies
    assert fresh.purchase_frequency == 2.0
    assert (fresh.delivered, fresh.unique_clicks, fresh.click_rate) == (2, 1, 0.5)  # the scanner's is no click
    assert kpis["loyal"].repeat_purchase_rate == 1.0 and kpis["loyal"].average_order_value == {"EUR": 8000.0}
    assert kpis["active"].conversion_rate == 0.0 and kpis["active"].click_rate is None  # no mail, no rate
    assert kpis["lapsed"].customers == 2 and kpis["lapsed"].purchase_frequency is None

