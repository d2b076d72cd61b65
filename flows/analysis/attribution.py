"""Last-touch attribution: each order goes to the latest marketing mail its customer touched.

For an order placed at ``p``, the touches are the same customer's, with their moment in
``[p - window, p]``, of the kinds the policy's ``basis`` names:

``click``     a person's click (``Engagement`` kind ``click``, ``machine`` empty) on a
              marketing send, at the click's time;
``open``      a person's open, likewise (not a default: Apple Mail opens everything);
``delivery``  a delivered marketing send (``sent`` or ``complained``), at its moment
              (``Send.evaluated_at``).

The latest touch wins; on a tie a click beats an open, an open beats a delivery, then the
higher send id wins. An order with no touch gets a row too, with ``send_id`` NULL and an
empty basis: it is not lost, and the next run knows it has seen it.

Everything is one ``INSERT … SELECT`` per run, whatever the number of orders: the touches
are found through ``ix_sends_customer_category_evaluated`` and ``ix_engagements_customer_at``
(a range per order on the customer's own rows) and ranked with ``row_number()``.

**Incremental and rebuild.** An incremental run attributes the orders placed by ``now``
that have no row yet. A rebuild deletes the rows of the orders placed by ``now`` and
attributes them again, in one transaction. Every touch of an order happens before the
order, so the two give the same rows, with two exceptions a rebuild reflects and an
earlier incremental row does not: a delivery that bounced afterwards is no longer a
delivery, and a customer's erased clicks (``lifecycle forget``) are gone.

**Retention.** With ``keep_for``, a run deletes clicks and opens older than
``now - keep_for`` after attributing, and records that moment in ``store_meta``
(``engagements_kept_since``). A later rebuild recomputes only the orders whose whole
window lies after it; older orders keep the rows they were given while their clicks
existed. So rebuild and incremental runs still agree after clicks are deleted.

**Time travel.** As of ``now``, only orders placed by ``now`` are attributed, and their
touches precede them, so nothing after ``now`` counts.
"""

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    and_,
    delete,
    func,
    literal,
    literal_column,
    select,
    true,
    type_coerce,
    union_all,
)
from sqlmodel import col

from flows.spec.policy import Attribution as AttributionPolicy
from models import Attribution, Engagement, Order, Send, SendStatus, StoreMeta
from models.db import insert_for
from models.types import UtcDateTime

DELIVERED = (SendStatus.SENT.value, SendStatus.COMPLAINED.value)
MARKETING = "marketing"
KEPT_SINCE = "engagements_kept_since"  # store_meta: clicks and opens before this moment were deleted
# The tie-break between touches at the same moment: lower wins.
_RANK = {"click": 0, "open": 1, "delivery": 2}


@dataclass
class AttributionTally:
    """What one run did: orders it looked at, how many it attributed (by basis) or not, and
    how many old clicks and opens it deleted."""

    orders_seen: int = 0
    attributed: int = 0
    unattributed: int = 0
    by_basis: dict[str, int] = field(default_factory=dict)
    deleted_engagements: int = 0


def shifted(moment: Any, delta: timedelta, dialect: str) -> ColumnElement[datetime]:
    """``moment + delta`` in SQL, for a timestamp column, exactly as the store compares them.

    On SQLite a timestamp is naive UTC text (``YYYY-MM-DD HH:MM:SS.ffffff``): the whole
    seconds are shifted by ``strftime`` and the fraction is kept as written, so the result
    compares as text with the column's own values to the microsecond. ``delta`` must be a
    whole number of seconds there.
    """
    if dialect == "postgresql":
        micros = delta // timedelta(microseconds=1)
        return type_coerce(moment + literal_column(f"INTERVAL '{micros} microseconds'"), UtcDateTime())
    if delta % timedelta(seconds=1):
        raise ValueError(f"a window of whole seconds, got {delta}")
    seconds = delta // timedelta(seconds=1)
    whole = func.strftime("%Y-%m-%d %H:%M:%S", func.substr(moment, 1, 19), f"{seconds:+d} seconds")
    return type_coerce(whole.op("||")(func.substr(moment, 20)), UtcDateTime())


def attribute(engine: Engine, policy: AttributionPolicy, now: datetime, *, rebuild: bool = False,
              keep_for: timedelta | None = None) -> AttributionTally:
    """Attribute the orders placed by ``now`` (those without a row, or all of them when
    ``rebuild``), then delete clicks and opens older than ``now - keep_for`` if given."""
    tally = AttributionTally()
    with engine.begin() as connection:
        kept_since = _kept_since(connection)
        if rebuild:
            recomputable = and_(*_recomputable(policy, now, kept_since))
            kept = connection.execute(select(col(Attribution.order_id)).where(~recomputable).limit(1)).first()
            # Emptying the whole table is SQLite's truncation (0.4 s for 300,000 rows); deleting
            # the same rows by a condition updates every index row by row (17 s).
            connection.execute(delete(Attribution) if kept is None else delete(Attribution).where(recomputable))
        bases = Counter(connection.execute(_insert(engine, policy, now)).scalars())
        tally.orders_seen = bases.total()
        tally.unattributed = bases.pop("", 0)
        tally.attributed = bases.total()
        tally.by_basis = dict(sorted(bases.items()))
        if keep_for is not None:
            # By the real clock, never a simulated later one: a run "as of" next year must not
            # delete today's clicks.
            horizon = min(now, datetime.now(UTC)) - keep_for
            tally.deleted_engagements = connection.execute(
                delete(Engagement).where(col(Engagement.at) < horizon)).rowcount
            if kept_since is None or horizon > kept_since:
                _set_kept_since(engine, connection, horizon)
    return tally


def _recomputable(policy: AttributionPolicy, now: datetime, kept_since: datetime | None) -> list[ColumnElement[bool]]:
    """The rows a rebuild may recompute: orders by ``now`` whose window lies inside the kept clicks."""
    where = [col(Attribution.placed_at) <= now]
    if kept_since is not None:
        where.append(col(Attribution.placed_at) >= kept_since + policy.window)
    return where


def _insert(engine: Engine, policy: AttributionPolicy, now: datetime) -> Any:
    """``INSERT INTO attributions … SELECT``: one row per order by ``now`` without one, returning its basis."""
    dialect = engine.dialect.name
    seen = select(col(Attribution.order_id)).where(col(Attribution.order_id) == col(Order.id))
    pending = (
        select(col(Order.id).label("order_id"), col(Order.customer_id), col(Order.placed_at),
               col(Order.total_cents), col(Order.currency),
               shifted(col(Order.placed_at), -policy.window, dialect).label("opens_at"))
        .where(col(Order.placed_at) <= now, ~seen.exists())
        .cte("pending")
    )
    touches = []
    for basis in policy.basis:
        rank = literal(_RANK[basis])
        if basis == "delivery":
            touches.append(
                select(pending.c.order_id, col(Send.id).label("send_id"), literal(basis).label("basis"),
                       col(Send.evaluated_at).label("touched_at"), rank.label("rank"))
                .join(Send, and_(col(Send.customer_id) == pending.c.customer_id, col(Send.category) == MARKETING,
                                 col(Send.evaluated_at) >= pending.c.opens_at,
                                 col(Send.evaluated_at) <= pending.c.placed_at))
                .where(col(Send.status).in_(DELIVERED)))
        else:  # a person's click or open of a marketing send
            touches.append(
                select(pending.c.order_id, col(Engagement.send_id), literal(basis).label("basis"),
                       col(Engagement.at).label("touched_at"), rank.label("rank"))
                .join(Engagement, and_(col(Engagement.customer_id) == pending.c.customer_id,
                                       col(Engagement.at) >= pending.c.opens_at,
                                       col(Engagement.at) <= pending.c.placed_at))
                .join(Send, col(Send.id) == col(Engagement.send_id))
                .where(col(Engagement.kind) == basis, col(Engagement.machine) == "",
                       col(Send.category) == MARKETING))
    every = union_all(*touches).subquery("touches")
    ranked = select(
        every,
        func.row_number().over(partition_by=every.c.order_id,
                               order_by=(every.c.touched_at.desc(), every.c.rank, every.c.send_id.desc()))
        .label("place"),
    ).cte("ranked")
    winner = select(ranked).where(ranked.c.place == 1).cte("winner")
    rows = (
        select(pending.c.order_id, pending.c.customer_id, pending.c.placed_at, pending.c.total_cents,
               pending.c.currency, winner.c.send_id, col(Send.trigger),
               func.coalesce(col(Send.stage), ""), func.coalesce(col(Send.template), ""),
               func.coalesce(winner.c.basis, ""), winner.c.touched_at)
        .outerjoin(winner, winner.c.order_id == pending.c.order_id)
        .outerjoin(Send, col(Send.id) == winner.c.send_id)
        # SQLite's parser would read the ON of ON CONFLICT as the join's: a WHERE ends the join.
        .where(true())
    )
    columns = ["order_id", "customer_id", "placed_at", "total_cents", "currency", "send_id", "trigger", "stage",
               "template", "basis", "touched_at"]
    table = Attribution.__table__  # type: ignore[attr-defined]
    # Two runs at once: the second skips the orders the first has written.
    return (insert_for(engine)(table).from_select(columns, rows).on_conflict_do_nothing()
            .returning(table.c.basis))


def _kept_since(connection: Connection) -> datetime | None:
    value = connection.execute(select(col(StoreMeta.value)).where(col(StoreMeta.key) == KEPT_SINCE)).scalar()
    return None if value is None else datetime.fromisoformat(value).astimezone(UTC)


def _set_kept_since(engine: Engine, connection: Connection, horizon: datetime) -> None:
    value = horizon.astimezone(UTC).isoformat()
    statement = insert_for(engine)(StoreMeta).values(key=KEPT_SINCE, value=value)
    connection.execute(statement.on_conflict_do_update(index_elements=["key"], set_={"value": value}))
