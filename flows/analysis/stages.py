"""Lifecycle analytics: how many customers are in each stage over time, who moved where, and
how each stage behaves.

Every stage here is computed by the very SQL a run uses (``flows.audience.stage_sql``), as
of a moment, set-based: one grouped query per moment over customers and their orders, never
a loop over customers. A customer counts at a moment once they exist then: signed up by it
(``created_at``), or with an order placed by it (a shop's imported history may predate the
profile).

A date given for a moment (``distribution``, ``transitions``) means the end of that day in
UTC, so the week ending on Sunday 15 March is read as of Monday 16 March, 00:00 UTC. A date
given for a period's bounds (``stage_kpis``) means the start of that day: ``since``
inclusive, ``until`` exclusive, as everywhere in the reports.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import Engine, Select, case, func, or_, select
from sqlmodel import col

from flows.audience.stage_sql import customer_stage, order_count, with_orders
from flows.spec.stages import StageRules
from models import Customer, Engagement, Order, Send, SendStatus

JOINED = "(joined)"  # the "from" of a transition for a customer who did not exist yet at its start
DELIVERED = (SendStatus.SENT.value, SendStatus.COMPLAINED.value)


def end_of(day: date | datetime) -> datetime:
    """The moment a date stands for as a point in time: its end (the next midnight, UTC). A
    datetime is that moment already."""
    if isinstance(day, datetime):
        return day if day.tzinfo else day.replace(tzinfo=UTC)
    return datetime.combine(day + timedelta(days=1), time(0), UTC)


def start_of(day: date | datetime) -> datetime:
    """A period bound: a date is its first moment (midnight, UTC)."""
    if isinstance(day, datetime):
        return day if day.tzinfo else day.replace(tzinfo=UTC)
    return datetime.combine(day, time(0), UTC)


def week_ends(since: date, until: date) -> list[date]:
    """The Sundays in [since, until]: the ends of the weeks a chart shows."""
    first = since + timedelta(days=(6 - since.weekday()) % 7)
    return [first + timedelta(weeks=n) for n in range(max(0, (until - first).days // 7 + 1))]


def stages_at(rules: StageRules, moment: datetime) -> Select[Any, str, int]:
    """``(customer_id, stage, orders)`` for every customer who exists at ``moment``."""
    stage = customer_stage(rules, moment).label("stage")
    query: Select[Any, str, int] = (
        select(col(Customer.id).label("customer_id"), stage, order_count().label("orders"))
        .where(or_(col(Customer.created_at) <= moment, col(Order.customer_id).is_not(None))))
    return with_orders(query, Customer.id, moment).group_by(col(Customer.id))


def distribution(engine: Engine, rules: StageRules,
                 dates: Sequence[date | datetime]) -> list[tuple[date | datetime, dict[str, int]]]:
    """Customers per stage as of each date's end: every stage listed, in the rules' order (0
    for an empty one). Shares are each count over the date's total."""
    out: list[tuple[date | datetime, dict[str, int]]] = []
    with engine.connect() as connection:
        for day in dates:
            at = stages_at(rules, end_of(day)).subquery("at")
            query = select(at.c.stage, func.count()).group_by(at.c.stage)
            counts: dict[str, int] = dict(connection.execute(query).all())
            out.append((day, {name: int(counts.get(name, 0)) for name in rules.names}))
    return out


def transitions(engine: Engine, rules: StageRules, start: date | datetime,
                end: date | datetime) -> dict[str, dict[str, int]]:
    """``{from_stage: {to_stage: customers}}`` between the ends of two dates: every customer
    who exists at the end, from their stage at the start (``JOINED`` if they did not exist
    yet). Every row and column is listed, zeros included, in the rules' order."""
    before = stages_at(rules, end_of(start)).subquery("before")
    after = stages_at(rules, end_of(end)).subquery("after")
    origin = func.coalesce(before.c.stage, JOINED)
    query = (select(origin, after.c.stage, func.count()).select_from(after)
             .outerjoin(before, before.c.customer_id == after.c.customer_id).group_by(origin, after.c.stage))
    matrix = {source: dict.fromkeys(rules.names, 0) for source in [JOINED, *rules.names]}
    with engine.connect() as connection:
        for source, target, n in connection.execute(query):
            matrix[source][target] = int(n)
    return matrix


@dataclass(frozen=True)
class StageKpis:
    """One stage's behaviour over a period, for the customers in it at the period's start
    (the cohort: a stage's figures describe the same people throughout).

    - ``conversion_rate``: the share of the stage's customers with an order in the period;
    - ``repeat_purchase_rate``: of those who ordered in the period, the share for whom it
      was a repeat: two orders or more in the period, or one after an earlier order;
    - ``average_order_value``: revenue in the period / orders in the period, per currency
      (cents; never across currencies);
    - ``purchase_frequency``: orders in the period / customers who ordered in it;
    - ``click_rate``: marketing mails to the stage's customers in the period (by the send's
      moment) with a human click / those delivered.
    """

    stage: str
    customers: int
    purchasers: int
    repeat_purchasers: int
    orders: int
    orders_by_currency: dict[str, int] = field(default_factory=dict)
    revenue: dict[str, int] = field(default_factory=dict)
    delivered: int = 0
    unique_clicks: int = 0

    @property
    def conversion_rate(self) -> float | None:
        return self.purchasers / self.customers if self.customers else None

    @property
    def repeat_purchase_rate(self) -> float | None:
        return self.repeat_purchasers / self.purchasers if self.purchasers else None

    @property
    def average_order_value(self) -> dict[str, float]:
        return {c: round(cents / self.orders_by_currency[c], 2) for c, cents in self.revenue.items()
                if self.orders_by_currency.get(c)}

    @property
    def purchase_frequency(self) -> float | None:
        return self.orders / self.purchasers if self.purchasers else None

    @property
    def click_rate(self) -> float | None:
        return self.unique_clicks / self.delivered if self.delivered else None

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "customers": self.customers, "purchasers": self.purchasers,
                "repeat_purchasers": self.repeat_purchasers, "orders": self.orders,
                "conversion_rate": self.conversion_rate, "repeat_purchase_rate": self.repeat_purchase_rate,
                "average_order_value": self.average_order_value, "purchase_frequency": self.purchase_frequency,
                "delivered": self.delivered, "unique_clicks": self.unique_clicks, "click_rate": self.click_rate,
                "revenue": self.revenue}


def stage_kpis(engine: Engine, rules: StageRules, since: date | datetime,
               until: date | datetime) -> list[StageKpis]:
    """Each stage's KPIs over [since, until) (see ``StageKpis``), in the rules' order. Three
    grouped queries over the cohort: orders per customer, orders per currency, mails."""
    start, stop = start_of(since), start_of(until)
    cohort = stages_at(rules, start).subquery("cohort")
    in_period = (select(col(Order.customer_id).label("customer_id"), func.count().label("n"))
                 .where(col(Order.placed_at) >= start, col(Order.placed_at) < stop)
                 .group_by(col(Order.customer_id)).subquery("in_period"))
    bought = in_period.c.customer_id.is_not(None)
    repeat = case((bought & ((in_period.c.n >= 2) | (cohort.c.orders > 0)), 1), else_=0)
    people = (select(cohort.c.stage, func.count(), func.count(in_period.c.customer_id), func.sum(repeat),
                     func.coalesce(func.sum(in_period.c.n), 0))
              .select_from(cohort).outerjoin(in_period, in_period.c.customer_id == cohort.c.customer_id)
              .group_by(cohort.c.stage))
    money = (select(cohort.c.stage, col(Order.currency), func.count(), func.sum(col(Order.total_cents)))
             .select_from(cohort)
             .join(Order, (col(Order.customer_id) == cohort.c.customer_id) & (col(Order.placed_at) >= start)
                   & (col(Order.placed_at) < stop))
             .group_by(cohort.c.stage, col(Order.currency)))
    clicked = (select(col(Engagement.send_id).label("send_id"))
               .where(col(Engagement.kind) == "click", col(Engagement.machine) == "").distinct().subquery("clicked"))
    mails = (select(cohort.c.stage, func.count(), func.count(clicked.c.send_id)).select_from(cohort)
             .join(Send, (col(Send.customer_id) == cohort.c.customer_id) & (col(Send.category) == "marketing")
                   & col(Send.status).in_(DELIVERED) & (col(Send.evaluated_at) >= start)
                   & (col(Send.evaluated_at) < stop))
             .outerjoin(clicked, clicked.c.send_id == col(Send.id))
             .group_by(cohort.c.stage))
    found: dict[str, dict[str, Any]] = {name: {"stage": name, "customers": 0, "purchasers": 0, "repeat_purchasers": 0,
                                               "orders": 0, "orders_by_currency": {}, "revenue": {}}
                                        for name in rules.names}
    with engine.connect() as connection:
        for stage, customers, purchasers, repeaters, orders in connection.execute(people):
            found[stage].update(customers=int(customers), purchasers=int(purchasers),
                                repeat_purchasers=int(repeaters or 0), orders=int(orders or 0))
        for stage, currency, orders, cents in connection.execute(money):
            found[stage]["orders_by_currency"][currency] = int(orders)
            found[stage]["revenue"][currency] = int(cents or 0)
        for stage, delivered, unique in connection.execute(mails):
            found[stage].update(delivered=int(delivered), unique_clicks=int(unique))
    return [StageKpis(**found[name]) for name in rules.names]

