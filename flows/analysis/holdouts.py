"""Did the mail cause it? Each trigger's treated customers against its held-out ones.

By intention to treat, the same way in both arms: the units are customers (the hash fixes
a customer's arm, ``flows.audience.holdout``). A customer is a recipient of an arm if one
of their rows in it (treated: claimed, sending, sent, bounced, complained, failed; held
out: ``held_out``) has its moment (``Send.evaluated_at``, the send or the would-be send)
in the period, ``since`` inclusive, ``until`` exclusive. A recipient converted if one of
their orders was placed in ``(e, e + window]`` for one of those moments ``e``, clicked or
not: a held-out customer cannot click, so click attribution is never compared with the
control. An arm's revenue is the sum of those orders, each counted once. Deferred and
expired rows are in neither arm: the draw is made when the mail would go. A customer with
rows in both arms (the salt or the share changed) counts in each.

Money is never summed across currencies: a trigger gets one row per currency its
converted orders were paid in (one row, currency ``""``, if none). Conversions do not
depend on money, so every currency row of a trigger has the same recipients,
conversions, rate, lift and verdict; its revenue, revenue per recipient and their lift
count only that currency's orders (a recipient who paid in another currency adds a zero).

The conversion lift's interval is Newcombe's; the revenue lift's a seeded percentile
bootstrap (``flows.analysis.lift``), seeded by trigger and currency so the same store
gives the same report. Conclusive means the conversion interval excludes zero.
"""

import zlib
from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Engine, and_, case, distinct, func, select
from sqlmodel import col

from flows.analysis import lift as stats
from flows.analysis.attribution import shifted
from models import Order, Send, SendStatus

TREATED = tuple(s.value for s in (SendStatus.CLAIMED, SendStatus.SENDING, SendStatus.SENT, SendStatus.BOUNCED,
                                  SendStatus.COMPLAINED, SendStatus.FAILED))
HELD_OUT = SendStatus.HELD_OUT.value
ARMS = ("treated", "held_out")
DEFAULT_EFFECT = 0.01  # the lift, one point of conversion rate, whose sample size "not yet conclusive" tells


@dataclass(frozen=True)
class ArmResult:
    recipients: int
    conversions: int
    rate: float
    revenue_cents: int
    revenue_per_recipient_cents: float


@dataclass(frozen=True)
class HoldoutLift:
    """One trigger in one currency. Intervals are 95 %; the revenue ones are None when an arm is empty.

    ``needed_per_arm``: held-out recipients an arm needs to detect a lift of ``effect`` at
    80 % power (the treated arm needs as many times more as it has now); None once conclusive.
    """

    trigger: str
    currency: str
    treated: ArmResult
    held_out: ArmResult
    lift: float
    lift_ci: tuple[float, float]
    revenue_lift_per_recipient_cents: float
    revenue_lift_per_recipient_ci: tuple[float, float] | None
    incremental_revenue_cents: float
    incremental_revenue_ci: tuple[float, float] | None
    conclusive: bool
    needed_per_arm: int | None
    verdict: str


@dataclass
class _Arm:
    recipients: int = 0
    converted: set[int] = field(default_factory=set)
    # currency → converted customer → cents
    revenue: defaultdict[str, dict[int, int]] = field(default_factory=lambda: defaultdict(dict))


def lift_by_trigger(engine: Engine, *, since: datetime, until: datetime, window: timedelta,
                    triggers: Collection[str] | None = None, effect: float = DEFAULT_EFFECT, resamples: int = 2000,
                    seed: int = 0, now: datetime | None = None) -> list[HoldoutLift]:
    """Per trigger with held-out rows in the period, and per currency: both arms, the lift and a verdict.
    ``now``: as of that moment, only orders placed by then count (time travel)."""
    arms = _arms(engine, since, until, window, triggers, now)
    results = []
    for trigger in sorted({trigger for trigger, _ in arms}):
        treated, held = arms.get((trigger, "treated"), _Arm()), arms[(trigger, "held_out")]
        currencies = sorted(set(treated.revenue) | set(held.revenue)) or [""]
        for currency in currencies:
            results.append(_compare(trigger, currency, treated, held, effect=effect, resamples=resamples,
                                    seed=seed + zlib.crc32(f"{trigger}\x1f{currency}".encode())))
    return results


def _arms(engine: Engine, since: datetime, until: datetime, window: timedelta,
          triggers: Collection[str] | None, now: datetime | None = None) -> dict[tuple[str, str], _Arm]:
    """(trigger, arm) → recipients, converted customers and their revenue per currency, in two queries."""
    in_period = [col(Send.evaluated_at) >= since, col(Send.evaluated_at) < until]
    if triggers is not None:
        in_period.append(col(Send.trigger).in_(list(triggers)))
    with_holdout = select(col(Send.trigger)).where(col(Send.status) == HELD_OUT, *in_period).distinct()
    arm = case((col(Send.status) == HELD_OUT, "held_out"), else_="treated")
    exposures = (
        select(col(Send.trigger), col(Send.customer_id), arm.label("arm"), col(Send.evaluated_at).label("at"))
        .where(col(Send.status).in_((*TREATED, HELD_OUT)), col(Send.trigger).in_(with_holdout), *in_period)
        .cte("exposures")
    )
    recipients = (select(exposures.c.trigger, exposures.c.arm, func.count(distinct(exposures.c.customer_id)))
                  .group_by(exposures.c.trigger, exposures.c.arm))
    # Each order once per arm, however many of the customer's windows it falls in.
    converting = (
        select(exposures.c.trigger, exposures.c.arm, col(Order.id), col(Order.customer_id), col(Order.total_cents),
               col(Order.currency))
        .join(Order, and_(col(Order.customer_id) == exposures.c.customer_id, col(Order.placed_at) > exposures.c.at,
                          col(Order.placed_at) <= shifted(exposures.c.at, window, engine.dialect.name)))
        .where(col(Order.placed_at) > since, col(Order.placed_at) <= until + window,
               *([col(Order.placed_at) <= now] if now is not None else []))
        .distinct()
        .subquery("converting")
    )
    revenue = (select(converting.c.trigger, converting.c.arm, converting.c.customer_id, converting.c.currency,
                      func.sum(converting.c.total_cents))
               .group_by(converting.c.trigger, converting.c.arm, converting.c.customer_id, converting.c.currency))
    arms: defaultdict[tuple[str, str], _Arm] = defaultdict(_Arm)
    with engine.connect() as connection:
        for trigger, name, count in connection.execute(recipients):
            arms[(trigger, name)].recipients = int(count)
        for trigger, name, customer, currency, cents in connection.execute(revenue):
            found = arms[(trigger, name)]
            found.converted.add(customer)
            found.revenue[currency][customer] = int(cents)
    return dict(arms)


def _arm_result(arm: _Arm, currency: str) -> ArmResult:
    conversions = len(arm.converted)
    cents = sum(arm.revenue.get(currency, {}).values())
    n = arm.recipients
    return ArmResult(recipients=n, conversions=conversions, rate=conversions / n if n else 0.0, revenue_cents=cents,
                     revenue_per_recipient_cents=cents / n if n else 0.0)


def _compare(trigger: str, currency: str, treated_arm: _Arm, held_arm: _Arm, *, effect: float, resamples: int,
             seed: int) -> HoldoutLift:
    treated, held = _arm_result(treated_arm, currency), _arm_result(held_arm, currency)
    low, high = stats.newcombe(treated.conversions, treated.recipients, held.conversions, held.recipients)
    revenue_lift = treated.revenue_per_recipient_cents - held.revenue_per_recipient_cents
    revenue_ci: tuple[float, float] | None = None
    incremental_ci: tuple[float, float] | None = None
    if treated.recipients and held.recipients:
        spent_t = list(treated_arm.revenue.get(currency, {}).values())
        spent_h = list(held_arm.revenue.get(currency, {}).values())
        revenue_ci = stats.bootstrap_mean_difference(
            spent_t, spent_h, seed=seed, resamples=resamples,
            zeros_a=treated.recipients - len(spent_t), zeros_b=held.recipients - len(spent_h))
        incremental_ci = (revenue_ci[0] * treated.recipients, revenue_ci[1] * treated.recipients)
    conclusive = low > 0 or high < 0
    needed = None if conclusive else _needed(treated, held, effect)
    return HoldoutLift(
        trigger=trigger, currency=currency, treated=treated, held_out=held, lift=treated.rate - held.rate,
        lift_ci=(low, high), revenue_lift_per_recipient_cents=revenue_lift, revenue_lift_per_recipient_ci=revenue_ci,
        incremental_revenue_cents=revenue_lift * treated.recipients, incremental_revenue_ci=incremental_ci,
        conclusive=conclusive, needed_per_arm=needed,
        verdict=_verdict(treated, held, (low, high), needed, effect))


def _needed(treated: ArmResult, held: ArmResult, effect: float) -> int:
    """Held-out recipients needed for ``effect``: the baseline is both arms' rate together (the
    small held-out arm alone is a shaky estimate), the ratio the arms' own."""
    recipients = treated.recipients + held.recipients
    baseline = (treated.conversions + held.conversions) / recipients if recipients else 0.0
    baseline = min(baseline, 1 - effect) if effect > 0 else max(baseline, -effect)
    ratio = treated.recipients / held.recipients if treated.recipients and held.recipients else 1.0
    return stats.sample_size(baseline, effect, ratio)


def _points(value: float) -> str:
    return f"{value * 100:.1f}"


def _verdict(treated: ArmResult, held: ArmResult, interval: tuple[float, float], needed: int | None,
             effect: float) -> str:
    low, high = interval
    lift = treated.rate - held.rate
    if needed is None:
        direction = "raises" if low > 0 else "lowers"
        return (f"conclusive: the mail {direction} conversion by {_points(abs(lift))} points "
                f"(95 % interval {_points(low)} to {_points(high)})")
    more_held = max(0, needed - held.recipients)
    ratio = treated.recipients / held.recipients if held.recipients else 1.0
    if more_held == 0:
        return (f"not yet conclusive: these arms would show a lift of {_points(abs(effect))} points 80 % of the "
                f"time, so any lift is likely smaller")
    more_treated = max(0, round(needed * ratio) - treated.recipients)
    return (f"not yet conclusive: about {more_held:,} more held-out recipients (and {more_treated:,} more treated) "
            f"would detect a lift of {_points(abs(effect))} points")
