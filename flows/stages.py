"""Stage evaluation in SQL: one CASE expression over a customer's order statistics.

The statistics are aggregated per customer in a correlated subquery, which walks the
covering index ``(customer_id, placed_at, total_cents)``: for an audience of hundreds of
thousands that is two to three times faster than aggregating every order first and
joining the result, on SQLite and PostgreSQL alike.
"""

from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any

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

from flows.spec.stages import StageCondition, StageRules
from models import Customer, Order

# A customer's orders, aggregated (in a subquery over that customer's orders).
_STATS = SimpleNamespace(c=SimpleNamespace(
    order_count=func.count(),
    total_cents=func.sum(Order.total_cents),
    first_order_at=func.min(Order.placed_at),
    last_order_at=func.max(Order.placed_at),
))


def _orders_of(customer_id: Any, now: datetime, *columns: Any) -> Select:
    return select(*columns).where(Order.customer_id == customer_id, Order.placed_at <= now)


def customer_stage(rules: StageRules, customer_id: Any, now: datetime) -> ColumnElement[str]:
    """The stage of the customer ``customer_id`` (a column) as of ``now``."""
    return _orders_of(customer_id, now, stage_expression(rules, _STATS, now)).scalar_subquery()


def order_count(customer_id: Any, now: datetime) -> ColumnElement[int]:
    return _orders_of(customer_id, now, func.count()).scalar_subquery()


def order_value(customer_id: Any, now: datetime) -> ColumnElement[int]:
    """Lifetime value in cents (0 without orders)."""
    return _orders_of(customer_id, now, func.coalesce(func.sum(Order.total_cents), 0)).scalar_subquery()


def _condition(cond: StageCondition, stats, now: datetime) -> ColumnElement[bool]:
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


def stage_expression(rules: StageRules, stats, now: datetime) -> ColumnElement[str]:
    """The first rule that matches names the stage; the last rule matches everyone."""
    whens = [
        (or_(false(), *(_condition(c, stats, now) for c in rule.when)), literal(rule.name))
        for rule in rules.stages[:-1]
    ]
    fallback = literal(rules.stages[-1].name)
    return case(*whens, else_=fallback) if whens else fallback


def customer_stages(rules: StageRules, now: datetime) -> Select:
    """``(customer_id, stage)`` for every customer: for previews, reports and tests."""
    return select(Customer.id, customer_stage(rules, Customer.id, now).label("stage"))
