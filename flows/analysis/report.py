"""What each trigger's marketing mail did: delivered, clicked, converted, earned.

Rows are per trigger, and per (trigger, stage), (trigger, template folder) and (trigger,
variant). Every figure is read from the ledger (``sends``), the recorded clicks and opens
(``engagements``) and the stored attributions (``attributions``, see
``flows.analysis.attribution``), never from the event log: a few grouped queries at the
finest grain (trigger, stage, template), summed into the coarser rows here. Each send
falls in exactly one fine group, so counts of distinct sends add up exactly.

Definitions (the shared ones, ``models.ledger`` for the states):

- the period is on the send's moment (``evaluated_at``): ``since`` inclusive, ``until``
  exclusive; only marketing sends;
- ``delivered``: sends in ``sent`` or ``complained``; ``bounced``: in ``bounced``;
- ``unique_clicks``: sends with at least one human click (``machine`` empty);
  ``click_rate`` = unique_clicks / delivered;
- ``opens``: sends with at least one open that was not a machine's. Unreliable: Apple
  Mail Privacy Protection fetches every image, so an "open" may be nobody;
- ``conversions``: orders attributed to the group's sends; ``converted_sends``: sends with
  at least one; ``conversion_rate`` = converted_sends / delivered;
- ``revenue``: the attributed orders' totals, per currency (never summed across
  currencies); ``revenue_per_recipient`` = revenue / delivered, per currency (a recipient
  is one delivered mail, as the commercial tools count it).

An order with no touch in the window is ``unattributed`` (stored with no send) and shown
on its own line, by its ``placed_at`` in the period: it is never lost. Orders the
attribution has not looked at yet are counted as ``pending``.
"""

import math
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Connection, Engine, case, func, select
from sqlmodel import col

from flows.analysis.holdouts import DEFAULT_EFFECT, HoldoutLift, lift_by_trigger
from flows.spec.policy import Policy
from models import Attribution, Engagement, Order, Send, SendStatus

SCHEMA = "lifecycle.report/1"
DELIVERED = (SendStatus.SENT.value, SendStatus.COMPLAINED.value)
DIMENSIONS = ("trigger", "stage", "template", "variant")
OPENS_NOTE = ("opens are unreliable: Apple Mail Privacy Protection fetches every image, so an open may be nobody; "
              "never used for attribution by default")
NO_VARIANT = ""  # a mail of no experiment: the report calls it the default one


@dataclass(frozen=True)
class _Counts:
    """What one group of sends adds up to (fine groups are summed into report rows)."""

    delivered: int = 0
    bounced: int = 0
    unique_clicks: int = 0
    opens: int = 0
    conversions: int = 0
    converted_sends: int = 0
    revenue: dict[str, int] = field(default_factory=dict)

    def __add__(self, other: "_Counts") -> "_Counts":
        revenue = dict(self.revenue)
        for currency, cents in other.revenue.items():
            revenue[currency] = revenue.get(currency, 0) + cents
        return _Counts(self.delivered + other.delivered, self.bounced + other.bounced,
                       self.unique_clicks + other.unique_clicks, self.opens + other.opens,
                       self.conversions + other.conversions, self.converted_sends + other.converted_sends, revenue)


@dataclass(frozen=True)
class ReportRow:
    """One row: a trigger (``dimension='trigger'``, ``value=''``), or one of its stages,
    template folders or variants (``value`` names it; the variant ``''`` is the default)."""

    trigger: str
    dimension: str
    value: str
    delivered: int
    bounced: int
    unique_clicks: int
    opens: int
    conversions: int
    converted_sends: int
    revenue: dict[str, int]

    @property
    def click_rate(self) -> float | None:
        return self.unique_clicks / self.delivered if self.delivered else None

    @property
    def conversion_rate(self) -> float | None:
        return self.converted_sends / self.delivered if self.delivered else None

    @property
    def revenue_per_recipient(self) -> dict[str, float]:
        """Cents per delivered mail, per currency (empty with nothing delivered)."""
        if not self.delivered:
            return {}
        return {currency: round(cents / self.delivered, 2) for currency, cents in self.revenue.items()}

    def as_dict(self) -> dict[str, Any]:
        return {"trigger": self.trigger, "dimension": self.dimension, "value": self.value,
                "delivered": self.delivered, "bounced": self.bounced, "unique_clicks": self.unique_clicks,
                "click_rate": self.click_rate, "opens": self.opens, "conversions": self.conversions,
                "converted_sends": self.converted_sends, "conversion_rate": self.conversion_rate,
                "revenue": dict(sorted(self.revenue.items())),
                "revenue_per_recipient": dict(sorted(self.revenue_per_recipient.items()))}


@dataclass(frozen=True)
class Unattributed:
    """Orders placed in the period with no marketing touch in the window (``orders``,
    ``revenue`` per currency), and orders the attribution has not looked at yet (``pending``)."""

    orders: int
    revenue: dict[str, int]
    pending: int


@dataclass(frozen=True)
class Report:
    since: datetime
    until: datetime
    window: timedelta
    basis: tuple[str, ...]
    rows: list[ReportRow]
    unattributed: Unattributed
    holdouts: list[HoldoutLift]
    opens_reliable: bool = False  # always: see OPENS_NOTE

    @property
    def triggers(self) -> list[str]:
        return sorted({row.trigger for row in self.rows})

    def row(self, trigger: str, dimension: str = "trigger", value: str = "") -> ReportRow | None:
        return next((r for r in self.rows if (r.trigger, r.dimension, r.value) == (trigger, dimension, value)), None)

    def rows_of(self, dimension: str) -> list[ReportRow]:
        return [r for r in self.rows if r.dimension == dimension]

    @property
    def currencies(self) -> list[str]:
        found = {c for r in self.rows for c in r.revenue} | set(self.unattributed.revenue)
        return sorted(found)

    def lines(self) -> list[str]:
        """One sentence per trigger, for a summary (Prefect artifacts, the top of the table)."""
        lines = []
        for trigger in self.triggers:
            row = self.row(trigger)
            assert row is not None
            text = (f"{trigger}: {row.delivered} delivered, {row.unique_clicks} clicked ({percent(row.click_rate)}), "
                    f"{row.conversions} order(s) ({percent(row.conversion_rate)} of delivered converted)")
            if row.revenue:
                text += f", {money(row.revenue)}"
            # The verdict is the conversion lift's, the same in every currency's row.
            for verdict in dict.fromkeys(h.verdict for h in self.holdouts if h.trigger == trigger):
                text += f"; holdout: {verdict}"
            lines.append(text + ".")
        return lines

    def to_json(self) -> dict[str, Any]:
        """The report as plain JSON values; the schema is ``SCHEMA``, documented in the README:

        ``schema``, ``period`` {since, until} (ISO-8601, until exclusive), ``attribution``
        {window_seconds, basis}, ``opens_reliable`` (false) and ``opens_note``, ``rows``
        (``ReportRow.as_dict``: counts, rates as fractions or null without deliveries,
        money in cents per currency), ``unattributed`` {orders, revenue, pending},
        ``holdouts`` (``HoldoutLift`` as a mapping) and ``summary`` (``lines``).
        """
        return {
            "schema": SCHEMA,
            "period": {"since": self.since.isoformat(), "until": self.until.isoformat()},
            "attribution": {"window_seconds": int(self.window.total_seconds()), "basis": list(self.basis)},
            "opens_reliable": self.opens_reliable,
            "opens_note": OPENS_NOTE,
            "rows": [row.as_dict() for row in self.rows],
            "unattributed": {"orders": self.unattributed.orders,
                             "revenue": dict(sorted(self.unattributed.revenue.items())),
                             "pending": self.unattributed.pending},
            "holdouts": [_finite(asdict(lift)) for lift in self.holdouts],
            "summary": self.lines(),
        }

    def to_rows(self) -> list[dict[str, Any]]:
        """Flat rows for CSV: the same columns in every row, one revenue and one per-recipient
        column per currency present (``revenue_cents_EUR``…), rates as fractions, and a last
        row for unattributed orders (``dimension='unattributed'``)."""
        currencies = self.currencies
        out = []
        for row in self.rows:
            flat: dict[str, Any] = {k: v for k, v in row.as_dict().items()
                                    if k not in ("revenue", "revenue_per_recipient")}
            for currency in currencies:
                flat[f"revenue_cents_{currency}"] = row.revenue.get(currency, 0)
                flat[f"revenue_per_recipient_cents_{currency}"] = row.revenue_per_recipient.get(currency)
            out.append(flat)
        last: dict[str, Any] = dict.fromkeys(out[0] if out else _FLAT_COLUMNS, None)
        last.update(trigger="", dimension="unattributed", value="", conversions=self.unattributed.orders)
        for currency in currencies:
            last[f"revenue_cents_{currency}"] = self.unattributed.revenue.get(currency, 0)
        out.append(last)
        return out


_FLAT_COLUMNS = ("trigger", "dimension", "value", "delivered", "bounced", "unique_clicks", "click_rate", "opens",
                 "conversions", "converted_sends", "conversion_rate")


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such a float (an undefined interval) becomes null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.1%}"


def money(amounts: dict[str, int] | dict[str, float]) -> str:
    """``EUR 1,234.50; USD 12.00``: each currency apart."""
    if not amounts:
        return "-"
    return "; ".join(f"{currency} {cents / 100:,.2f}" for currency, cents in sorted(amounts.items()))


def _marketing_sends(since: datetime, until: datetime, triggers: list[str] | None) -> list[ColumnElement[bool]]:
    where = [col(Send.category) == "marketing", col(Send.evaluated_at) >= since, col(Send.evaluated_at) < until]
    if triggers:
        where.append(col(Send.trigger).in_(triggers))
    return where


_Fine = tuple[str, str, str, str]  # (trigger, stage, template, variant)


def holdouts_meanwhile(pool: ThreadPoolExecutor, engine: Engine, *, since: datetime, until: datetime,
                       triggers: list[str] | None = None, policy: Policy, now: datetime | None = None,
                       effect: float = DEFAULT_EFFECT) -> "Future[list[HoldoutLift]]":
    """The report's holdout comparison, started on ``pool`` (on a connection of its own). It
    reads only sends and orders, never the attributions, so a caller may start it before
    attributing new orders and hand it to ``build_report`` (``holdouts=``): ``lifecycle
    report`` does, and the comparison runs while the orders are attributed."""
    return pool.submit(lift_by_trigger, engine, since=since, until=until, window=policy.attribution.window,
                       triggers=triggers, now=now, effect=effect)


def build_report(engine: Engine, *, since: datetime, until: datetime, triggers: list[str] | None = None,
                 policy: Policy, now: datetime | None = None, effect: float = DEFAULT_EFFECT,
                 holdouts: "Future[list[HoldoutLift]] | None" = None) -> Report:
    """The report over marketing sends whose moment is in [since, until). ``now``: clicks,
    opens and orders after it are left out (a report as of a past moment); by default all.
    ``effect``: the lift (a difference of conversion rates, 0.01 is one point) whose sample
    size a holdout that is not yet conclusive is told. ``holdouts``: the holdout comparison
    of the same arguments already under way (``holdouts_meanwhile``); by default it is
    started here.

    One pass over the period's sends, each joined to what it drew (clicks and opens, folded
    to one row per send) and earned (its attributed orders, one row per send with a sum per
    currency), grouped by (trigger, stage, template); then the unattributed and pending
    orders by the index on ``placed_at``. Joining the engagements and attributions to the
    sends in separate queries scanned the ledger once per query: about 1 s each at 1.5 M
    sends (``bench/report.py``). The groups are listed stage first: grouped by trigger first,
    SQLite walked the whole ledger in the order of an index that starts with the trigger,
    one row lookup per send of every period, instead of scanning the table once (about
    2 s against 1 s over the last 30 days at 1.5 M sends, 4.6 against 3.4 s over 180)."""
    # A click comes after its mail, and an attributed order after its touch: nothing before
    # ``since`` can belong to a send of the period, so the folding skips it.
    engaged = [col(Engagement.machine) == "", col(Engagement.at) >= since,
               *([col(Engagement.at) <= now] if now else [])]
    earned_by = [col(Attribution.send_id).is_not(None), col(Attribution.placed_at) >= since,
                 *([col(Attribution.placed_at) <= now] if now else [])]
    touched = (select(col(Engagement.send_id).label("send_id"),
                      func.max(case((col(Engagement.kind) == "click", 1), else_=0)).label("clicked"),
                      func.max(case((col(Engagement.kind) == "open", 1), else_=0)).label("opened"))
               .where(*engaged).group_by(col(Engagement.send_id)).subquery("touched"))
    fine: dict[_Fine, _Counts] = {}
    # The holdout comparison reads only sends and orders: it runs on a connection of its own
    # meanwhile (the database works on both; about a second less at 1 M customers).
    with ThreadPoolExecutor(max_workers=1) as pool, engine.connect() as connection:
        lifts = holdouts or holdouts_meanwhile(pool, engine, since=since, until=until, triggers=triggers,
                                               policy=policy, now=now, effect=effect)
        currencies = sorted(connection.execute(select(col(Attribution.currency)).where(*earned_by).distinct())
                            .scalars())
        earned = (select(col(Attribution.send_id).label("send_id"), func.count().label("orders"),
                         *(func.sum(case((col(Attribution.currency) == currency, col(Attribution.total_cents)),
                                         else_=0)).label(f"cents_{i}") for i, currency in enumerate(currencies)))
                  .where(*earned_by).group_by(col(Attribution.send_id)).subquery("earned"))
        group = (col(Send.trigger), col(Send.stage), col(Send.template), col(Send.variant))
        query = (select(*group,
                        func.sum(case((col(Send.status).in_(DELIVERED), 1), else_=0)),
                        func.sum(case((col(Send.status) == SendStatus.BOUNCED.value, 1), else_=0)),
                        func.coalesce(func.sum(touched.c.clicked), 0), func.coalesce(func.sum(touched.c.opened), 0),
                        func.coalesce(func.sum(earned.c.orders), 0), func.count(earned.c.send_id),
                        *(func.coalesce(func.sum(earned.c[f"cents_{i}"]), 0) for i in range(len(currencies))))
                 .select_from(Send)
                 .outerjoin(touched, touched.c.send_id == col(Send.id))
                 .outerjoin(earned, earned.c.send_id == col(Send.id))
                 .where(*_marketing_sends(since, until, triggers))
                 .group_by(col(Send.stage), col(Send.template), col(Send.trigger), col(Send.variant)))  # see above
        for trigger, stage, template, variant, delivered, bounced, clicked, opened, orders, converted, *cents in (
                connection.execute(query)):
            revenue = {currency: int(n) for currency, n in zip(currencies, cents, strict=True) if n}
            fine[(trigger, stage, template, variant)] = _Counts(int(delivered or 0), int(bounced or 0), int(clicked),
                                                       int(opened), int(orders), int(converted), revenue)
        unattributed = _unattributed(connection, since, until, now)
        lifted = lifts.result()
    return Report(since=since, until=until, window=policy.attribution.window, basis=tuple(policy.attribution.basis),
                  rows=_rolled_up(fine), unattributed=unattributed, holdouts=lifted)


def _unattributed(connection: Connection, since: datetime, until: datetime, now: datetime | None) -> Unattributed:
    """Orders placed in the period without a mail, and those not looked at yet: every order
    the attribution has seen has one row placed when it was, so the orders in the period
    less the rows in it are the pending ones (two counts on the ``placed_at`` indexes)."""
    def placed(column: Any) -> list[ColumnElement[bool]]:
        return [column >= since, column < until, *([column <= now] if now else [])]

    revenue, orders, seen = {}, 0, 0
    for currency, unattributed, n, cents in connection.execute(
            select(col(Attribution.currency), col(Attribution.send_id).is_(None), func.count(),
                   func.sum(col(Attribution.total_cents)))
            .where(*placed(col(Attribution.placed_at)))
            .group_by(col(Attribution.currency), col(Attribution.send_id).is_(None))):
        seen += n
        if unattributed:
            revenue[currency] = int(cents or 0)
            orders += n
    placed_orders = connection.execute(select(func.count()).select_from(Order)
                                       .where(*placed(col(Order.placed_at)))).scalar_one()
    return Unattributed(orders=orders, revenue=revenue, pending=max(0, int(placed_orders) - seen))


def template_folder(template: str) -> str:
    """``abandoned_cart/default.de.html.j2`` → ``abandoned_cart``: the report's template."""
    return template.split("/")[0]


def _rolled_up(fine: dict[_Fine, _Counts]) -> list[ReportRow]:
    keyed: dict[tuple[str, str, str], _Counts] = defaultdict(_Counts)
    for (trigger, stage, template, variant), counts in fine.items():
        keyed[(trigger, "trigger", "")] += counts
        keyed[(trigger, "stage", stage)] += counts
        keyed[(trigger, "template", template_folder(template))] += counts
        keyed[(trigger, "variant", variant or NO_VARIANT)] += counts
    order = {d: i for i, d in enumerate(DIMENSIONS)}
    return [ReportRow(trigger, dimension, value, c.delivered, c.bounced, c.unique_clicks, c.opens, c.conversions,
                      c.converted_sends, dict(sorted(c.revenue.items())))
            for (trigger, dimension, value), c in sorted(keyed.items(),
                                                         key=lambda kv: (kv[0][0], order[kv[0][1]], kv[0][2]))]


def revenue_over_time(engine: Engine, *, since: datetime, until: datetime,
                      bucket_days: int = 7) -> dict[str, list[tuple[datetime, dict[str, int]]]]:
    """Attributed revenue per trigger in buckets of ``bucket_days`` from ``since``, by the
    order's ``placed_at`` (when the money came in), per currency. Every bucket is listed,
    empty ones as ``{}``, so a chart's axis is continuous. One grouped query: the bucket
    is a CASE over the buckets' bounds, the same SQL on both stores."""
    step = timedelta(days=bucket_days)
    starts = []
    moment = since
    while moment < until:
        starts.append(moment)
        moment += step
    if not starts:
        return {}
    placed = col(Attribution.placed_at)
    bucket = case(*((placed < start + step, i) for i, start in enumerate(starts)), else_=len(starts))
    query = (select(col(Attribution.trigger), bucket.label("bucket"), col(Attribution.currency),
                    func.sum(col(Attribution.total_cents)))
             .where(col(Attribution.send_id).is_not(None), placed >= since, placed < until)
             .group_by(col(Attribution.trigger), bucket, col(Attribution.currency)))
    found: dict[str, list[dict[str, int]]] = {}
    with engine.connect() as connection:
        for trigger, index, currency, cents in connection.execute(query):
            if trigger is None or index >= len(starts):
                continue
            buckets = found.setdefault(trigger, [{} for _ in starts])
            buckets[index][currency] = int(cents or 0)
    return {trigger: list(zip(starts, buckets, strict=True)) for trigger, buckets in sorted(found.items())}
