"""Stage evaluation in SQL: one CASE expression over per-customer order statistics."""

from datetime import datetime, timedelta

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


def order_stats(now: datetime) -> Select:
    """Orders placed up to ``now``, aggregated per customer (one pass, grouped)."""
    return (
        select(
            Order.customer_id.label("customer_id"),
            func.count().label("order_count"),
            func.sum(Order.total_cents).label("total_cents"),
            func.min(Order.placed_at).label("first_order_at"),
            func.max(Order.placed_at).label("last_order_at"),
        )
        .where(Order.placed_at <= now)
        .group_by(Order.customer_id)
    )


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
    stats = order_stats(now).subquery()
    return select(Customer.id, stage_expression(rules, stats, now).label("stage")).outerjoin(
        stats, stats.c.customer_id == Customer.id
    )
