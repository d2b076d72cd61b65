"""Stage evaluation in SQL: one CASE expression over a customer's order statistics.

The statistics are aggregates over the customer's orders, joined to the query's rows
(``with_orders``) and grouped per row: the join walks the covering index ``(customer_id,
placed_at, total_cents)`` in customer order, so each customer's stage is computed once
and the rows still stream. A correlated subquery per customer cost the same walk plus
one subquery run per row, and twice per row once the stage was also filtered on.
"""

from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any, TypeVarTuple

from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    case,
    false,
    func,
    literal,
    or_,
    select,
    true,
)
from sqlmodel import col

from flows.spec.stages import StageCondition, StageRules
from models import Customer, Order

Ts = TypeVarTuple("Ts")

# The joined orders' aggregates (with no order, count is 0 and the others NULL).
_ORDER_COUNT: ColumnElement[int] = func.count(col(Order.customer_id))  # in the covering index, unlike the id
_STATS = SimpleNamespace(c=SimpleNamespace(
    order_count=_ORDER_COUNT,
    total_cents=func.sum(col(Order.total_cents)),
    first_order_at=func.min(col(Order.placed_at)),
    last_order_at=func.max(col(Order.placed_at)),
))


def with_orders(query: Select[*Ts], customer_id: Any, now: datetime) -> Select[*Ts]:
    """``query`` outer-joined to the orders of ``customer_id`` (a column) placed by ``now``:
    group it by one row per customer to use the aggregates below."""
    return query.outerjoin(Order, and_(col(Order.customer_id) == customer_id, col(Order.placed_at) <= now))


def customer_stage(rules: StageRules, now: datetime) -> ColumnElement[str]:
    """The stage as of ``now``, over the orders joined by ``with_orders``."""
    return stage_expression(rules, _STATS, now)


def order_count() -> ColumnElement[int]:
    return _ORDER_COUNT


def order_value() -> ColumnElement[int]:
    """Lifetime value in cents (0 without orders)."""
    return func.coalesce(_STATS.c.total_cents, 0)


# ``stats``: anything whose ``.c`` has the columns of ``_STATS`` (order_count, total_cents,
# first_order_at, last_order_at).
def _condition(cond: StageCondition, stats: Any, now: datetime) -> ColumnElement[bool]:
    orders = func.coalesce(stats.c.order_count, 0)
    value = func.coalesce(stats.c.total_cents, 0)
    parts: list[ColumnElement[bool]] = []
    if cond.min_orders is not None:
        parts.append(orders >= cond.min_orders)
    if cond.max_orders is not None:
        parts.append(orders <= cond.max_orders)
    if cond.min_lifetime_value is not None:
        parts.append(value >= round(cond.min_lifetime_value * 100))
    if cond.max_lifetime_value is not None:
        parts.append(value <= round(cond.max_lifetime_value * 100))
    # Day bounds compare against constants computed here, so both back ends agree.
    if cond.min_days_since_last_order is not None:
        parts.append(stats.c.last_order_at <= now - timedelta(days=cond.min_days_since_last_order))
    if cond.max_days_since_last_order is not None:
        parts.append(stats.c.last_order_at > now - timedelta(days=cond.max_days_since_last_order))
    if cond.min_days_since_first_order is not None:
        parts.append(stats.c.first_order_at <= now - timedelta(days=cond.min_days_since_first_order))
    if cond.max_days_since_first_order is not None:
        parts.append(stats.c.first_order_at > now - timedelta(days=cond.max_days_since_first_order))
    return and_(true(), *parts)


def stage_expression(rules: StageRules, stats: Any, now: datetime) -> ColumnElement[str]:
    """The first rule that matches names the stage; the last rule matches everyone."""
    whens = [
        (or_(false(), *(_condition(c, stats, now) for c in rule.when)), literal(rule.name))
        for rule in rules.stages[:-1]
    ]
    fallback = literal(rules.stages[-1].name)
    return case(*whens, else_=fallback) if whens else fallback


def customer_stages(rules: StageRules, now: datetime) -> Select[int | None, str]:
    """``(customer_id, stage)`` for every customer: for previews, reports and tests."""
    query = select(col(Customer.id), customer_stage(rules, now).label("stage"))
    return with_orders(query, Customer.id, now).group_by(col(Customer.id))
