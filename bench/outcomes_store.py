"""The outcomes benchmark's store: 1 M customers, 10 M events, 1.5 M sends, 300 k orders, and clicks.

    python bench/outcomes_store.py [--sqlite PATH] [--postgres URL] [--customers N | --scale S] [--seed N]

Everything scales with the customer count (``--scale 0.01``: 10,000 customers, 100,000
events, and so on), and the same seed builds the same store, row for row:

- customers and events as ``bench/store.py`` makes them (about ten events each);
- sends over the 180 days before ``NOW``, 1.5 per customer: abandoned-cart (10 % held out),
  we-miss-you (20 % held out), onboarding and a spring sale (marketing), complaint
  replies (service mail); held out by the real hash (``flows.audience.holdout``), the
  rest mostly sent, a few bounced, complained, failed, deferred or expired;
- engagements: a person's click on 8 % of delivered marketing mail (some twice, on other
  links), a scanner's click seconds after 3 %, an open on 20 %;
- orders, 0.3 per customer, in EUR and some in USD: 8 % of treated and 6 % of held-out
  recipients buy within five days of the mail (so attribution and the holdouts find
  something), the rest at random moments.

Rows go in through the driver's bulk path, ``executemany`` in one transaction per chunk
on SQLite and ``COPY`` on PostgreSQL (foreign keys unchecked while loading), with the
secondary indexes dropped first and built after the load, then ``ANALYZE``.
``add_day`` adds one more day of sends, clicks and orders after ``NOW`` (what the daily
incremental run sees), replacing any day added before.
"""

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import Engine, text

from bench import store as base_store
from flows.audience.holdout import held_out
from models.db import create_schema, make_engine

NOW = datetime(2026, 3, 16, 12, 0, tzinfo=UTC)
DAYS = 180
CHUNK = 100_000
META_KEY = "bench_outcomes"
TABLES = ("customers", "events", "sends", "engagements", "orders", "attributions")


@dataclass(frozen=True)
class Trigger:
    name: str
    category: str
    holdout: float | None
    weight: float
    stage: str
    template: str


TRIGGERS = (
    Trigger("abandoned-cart", "marketing", 0.10, 0.30, "active", "abandoned_cart/default.de.html.j2"),
    Trigger("we-miss-you", "marketing", 0.20, 0.25, "at_risk", "we_miss_you/default.de.html.j2"),
    Trigger("onboarding", "marketing", None, 0.20, "new", "onboarding/day_3.de.html.j2"),
    Trigger("spring-sale", "marketing", None, 0.15, "active", "spring_sale/default.de.html.j2"),
    Trigger("complaint-received", "transactional", None, 0.10, "", "complaint_received/default.de.html.j2"),
)
_WEIGHTS = [t.weight for t in TRIGGERS]
LINKS = "https://shop.example/cart\nhttps://shop.example/p/1\nhttps://shop.example/sale"

SEND_COLUMNS = ("id", "send_key", "trigger", "customer_id", "occurrence", "category", "status", "run_id", "stage",
                "template", "email", "message_id", "evaluated_at", "claimed_at", "finished_at", "not_before",
                "smtp_reply", "error", "links")
ENGAGEMENT_COLUMNS = ("id", "send_id", "customer_id", "kind", "link", "at", "machine", "repeats")
ORDER_COLUMNS = ("id", "external_id", "customer_id", "placed_at", "total_cents", "currency", "products")


@dataclass(frozen=True)
class Size:
    customers: int
    seed: int = 16

    @property
    def sends(self) -> int:
        return round(self.customers * 1.5)

    @property
    def orders(self) -> int:
        return round(self.customers * 0.3)


def stamp(moment: datetime) -> str:
    """A timestamp as the store keeps it: naive UTC text, to the microsecond (both drivers read it)."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(" ", timespec="microseconds")


class Ids:
    """The next id of each table with generated rows, so chunks and added days never collide."""

    def __init__(self, sends: int = 0, engagements: int = 0, orders: int = 0) -> None:
        self.sends, self.engagements, self.orders = sends, engagements, orders


def history(rng: random.Random, size: Size, ids: Ids, count: int, start: datetime,
            span: timedelta) -> Iterator[tuple[list[tuple], list[tuple], list[tuple]]]:
    """``count`` sends at moments in ``[start, start + span)``, with their clicks and the orders
    they led to, in chunks: (sends, engagements, orders)."""
    seconds = span.total_seconds()
    end = start + span
    done = 0
    while done < count:
        sends: list[tuple] = []
        engagements: list[tuple] = []
        orders: list[tuple] = []
        for _ in range(min(CHUNK, count - done)):
            ids.sends += 1
            send_id = ids.sends
            customer = rng.randrange(1, size.customers + 1)
            trigger = rng.choices(TRIGGERS, _WEIGHTS)[0]
            at = start + timedelta(seconds=rng.random() * seconds)
            status, not_before = _status(rng, trigger, customer, at)
            moment = stamp(at)
            sends.append((send_id, f"{trigger.name}/{customer}/{send_id}", trigger.name, customer, str(send_id),
                          trigger.category, status, "bench", trigger.stage, trigger.template,
                          f"kunde{customer}@example.de", f"<{send_id:032x}@shop.example>", moment, moment,
                          moment if status != "held_out" else None, not_before, "250 ok" if status == "sent" else "",
                          "", LINKS if trigger.category == "marketing" else None))
            if trigger.category != "marketing":
                continue
            if status in ("sent", "complained"):
                for kind, link, delay, machine in _engagements(rng):
                    if at + delay < end:
                        ids.engagements += 1
                        engagements.append((ids.engagements, send_id, customer, kind, link, stamp(at + delay),
                                            machine, 0))
            bought = 0.06 if status == "held_out" else 0.08 if status in ("sent", "complained", "bounced") else 0.0
            if rng.random() < bought:
                placed = at + timedelta(seconds=rng.random() * 5 * 86_400)
                if placed < end:
                    orders.append(_order(rng, ids, customer, placed))
        done += len(sends)
        yield sends, engagements, orders


def _status(rng: random.Random, trigger: Trigger, customer: int, at: datetime) -> tuple[str, str | None]:
    if trigger.holdout and held_out(trigger.holdout, trigger.name, trigger.name, f"c{customer}"):  # salt: its name
        return "held_out", None
    draw = rng.random()
    if draw < 0.02:
        return "bounced", None
    if draw < 0.022:
        return "complained", None
    if draw < 0.027:
        return "failed", None
    if draw < 0.035 and trigger.category == "marketing":
        return "deferred", stamp(at + timedelta(hours=9))
    if draw < 0.04 and trigger.category == "marketing":
        return "expired", None
    return "sent", None


def _engagements(rng: random.Random) -> list[tuple[str, int, timedelta, str]]:
    """(kind, link, delay after the send, machine) for one delivered marketing mail."""
    found = []
    if rng.random() < 0.03:
        found.append(("click", 0, timedelta(seconds=rng.uniform(0.5, 4)), "too_soon"))
    if rng.random() < 0.20:
        found.append(("open", -1, timedelta(minutes=rng.expovariate(1 / 180)), ""))
    if rng.random() < 0.08:
        first = timedelta(minutes=10 + rng.expovariate(1 / 600))
        found.append(("click", rng.randrange(3), first, ""))
        if rng.random() < 0.25:
            found.append(("click", rng.randrange(3), first + timedelta(minutes=rng.uniform(2, 90)), ""))
    return found


def _order(rng: random.Random, ids: Ids, customer: int, placed: datetime) -> tuple:
    ids.orders += 1
    cents = max(500, round(rng.gammavariate(2.0, 3000)))
    return (ids.orders, f"bo{ids.orders}", customer, stamp(placed), cents, "USD" if rng.random() < 0.15 else "EUR",
            "[]")


def other_orders(rng: random.Random, size: Size, ids: Ids, count: int, start: datetime,
                 span: timedelta) -> Iterator[list[tuple]]:
    """Orders that follow no mail: random customers at random moments."""
    seconds = span.total_seconds()
    done = 0
    while done < count:
        chunk = [_order(rng, ids, rng.randrange(1, size.customers + 1),
                        start + timedelta(seconds=rng.random() * seconds)) for _ in range(min(CHUNK, count - done))]
        done += len(chunk)
        yield chunk


# -- Loading ----------------------------------------------------------------------------------------

def load(engine: Engine, table: str, columns: Sequence[str], chunks: Iterator[list[tuple]] | list[tuple]) -> int:
    """Rows into ``table`` by the bulk path: ``COPY`` on PostgreSQL, ``executemany`` on SQLite, in one
    transaction (foreign keys unchecked: the generator makes only rows that refer to rows it made)."""
    if isinstance(chunks, list):
        chunks = iter([chunks])
    total = 0
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        if engine.dialect.name == "postgresql":
            cursor.execute("SET session_replication_role = replica")
            with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                for chunk in chunks:
                    for row in chunk:
                        copy.write_row(row)
                    total += len(chunk)
            cursor.execute("SET session_replication_role = DEFAULT")
        else:
            # The engine's connections begin no transaction of their own (models.db): one per load.
            cursor.execute("PRAGMA foreign_keys=OFF")
            cursor.execute("PRAGMA cache_size=-1000000")  # the unique keys' B-trees stay in memory
            cursor.execute("BEGIN")
            statement = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
            for chunk in chunks:
                cursor.executemany(statement, chunk)
                total += len(chunk)
        raw.commit()
        if engine.dialect.name == "sqlite":
            cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        raw.close()
    return total


def secondary_indexes(engine: Engine) -> list[tuple[str, str]]:
    """(name, CREATE statement) of every index the load can drop: not a primary key or constraint."""
    with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            return [(name, sql) for name, sql in connection.execute(text(
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema() "
                "AND tablename = ANY(:tables) AND indexname NOT IN (SELECT conname FROM pg_constraint)"),
                {"tables": list(TABLES)})]
        return [(name, sql) for name, sql in connection.execute(text(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL "
            "AND tbl_name IN (" + ", ".join(f"'{t}'" for t in TABLES) + ")"))]


def execute(engine: Engine, *statements: str) -> None:
    with engine.begin() as connection:
        for statement in statements:
            connection.exec_driver_sql(statement)


def build(url: str, size: Size, log: Any = print) -> dict[str, Any]:
    """A new store at ``url`` (its tables emptied first); rows per table and seconds per step."""
    engine = make_engine(url)
    create_schema(engine)
    execute(engine, *(f"DELETE FROM {table}" for table in reversed(TABLES)), "DELETE FROM store_meta")
    indexes = secondary_indexes(engine)
    execute(engine, *(f"DROP INDEX {name}" for name, _ in indexes))
    rng, ids, clock = random.Random(size.seed), Ids(), base_store.Clock(NOW)
    figures: dict[str, Any] = {"size": asdict(size), "seconds": {}, "rows": {}}
    start = NOW - timedelta(days=DAYS)

    def step(name: str, table: str, columns: Sequence[str], chunks: Any) -> None:
        began = time.perf_counter()
        figures["rows"][table] = figures["rows"].get(table, 0) + load(engine, table, columns, chunks)
        figures["seconds"][name] = round(time.perf_counter() - began, 1)
        log(f"  {name}: {figures['rows'][table]:,} rows in {figures['seconds'][name]} s")

    customer_columns, customers = base_store.TABLES["customers"]
    step("customers", "customers", customer_columns, _chunked(customers(1, size.customers, clock)))
    event_columns, events = base_store.TABLES["events"]
    step("events", "events", event_columns, _chunked(events(1, size.customers, clock)))
    engagements: list[list[tuple]] = []
    orders: list[list[tuple]] = []

    def sends_with_rest() -> Iterator[list[tuple]]:
        for sends, clicks, bought in history(rng, size, ids, size.sends, start, timedelta(days=DAYS)):
            engagements.append(clicks)
            orders.append(bought)
            yield sends

    step("sends", "sends", SEND_COLUMNS, sends_with_rest())
    step("engagements", "engagements", ENGAGEMENT_COLUMNS, iter(engagements))
    following = sum(len(chunk) for chunk in orders)
    step("orders after a mail", "orders", ORDER_COLUMNS, iter(orders))
    step("other orders", "orders", ORDER_COLUMNS,
         other_orders(rng, size, ids, max(0, size.orders - following), start, timedelta(days=DAYS)))
    began = time.perf_counter()
    # SQLite sorts each index in its page cache: a large one builds it without spilling.
    cache = ["PRAGMA cache_size=-1000000"] if engine.dialect.name == "sqlite" else []
    execute(engine, *cache, *(sql for _, sql in indexes))
    figures["seconds"]["indexes"] = round(time.perf_counter() - began, 1)
    log(f"  {len(indexes)} indexes in {figures['seconds']['indexes']} s")
    began = time.perf_counter()
    if engine.dialect.name == "postgresql":
        execute(engine, *(f"SELECT setval(pg_get_serial_sequence('{t}', 'id'), (SELECT max(id) FROM {t}))"
                          for t in ("sends", "engagements", "orders", "customers", "events")))
    execute(engine, "ANALYZE")
    figures["seconds"]["analyze"] = round(time.perf_counter() - began, 1)
    meta = {"size": asdict(size), "ids": vars(ids)}
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO store_meta (key, value) VALUES (:key, :value)"),
                           {"key": META_KEY, "value": json.dumps(meta)})
    engine.dispose()
    return figures


def _chunked(rows: Iterator[tuple]) -> Iterator[list[tuple]]:
    while chunk := [row for _, row in zip(range(CHUNK), rows, strict=False)]:
        yield chunk


def built(engine: Engine) -> dict[str, Any] | None:
    """What the store at ``engine`` was built with (``size``, ``ids``), or None if it is not one."""
    try:
        with engine.connect() as connection:
            value = connection.execute(text("SELECT value FROM store_meta WHERE key = :key"),
                                       {"key": META_KEY}).scalar()
    except Exception:  # noqa: BLE001 - no such table: not a store yet
        return None
    return None if value is None else dict(json.loads(value))


def drop_added_day(engine: Engine) -> Ids:
    """Delete what ``add_day`` added (the store as built); the ids the build ended at."""
    meta = built(engine)
    assert meta is not None, "build the store first"
    ids = Ids(**meta["ids"])
    cut: Any = NOW.replace(tzinfo=None) if engine.dialect.name == "postgresql" else stamp(NOW)
    with engine.begin() as connection:
        for statement in ("DELETE FROM attributions WHERE placed_at > :cut", "DELETE FROM orders WHERE id > :orders",
                          "DELETE FROM engagements WHERE id > :engagements", "DELETE FROM sends WHERE id > :sends"):
            connection.execute(text(statement), {"cut": cut, "orders": ids.orders,
                                                 "engagements": ids.engagements, "sends": ids.sends})
    return ids


def add_day(engine: Engine) -> dict[str, int]:
    """One more day after ``NOW`` (replacing a day added before): its sends and their clicks, the
    orders that follow them and the mail of the five days before (as in the history, where a
    mailed customer buys within five days with 8 % or 6 %), and orders that follow no mail."""
    ids = drop_added_day(engine)
    size = Size(**(built(engine) or {})["size"])
    cut: Any = NOW.replace(tzinfo=None) if engine.dialect.name == "postgresql" else stamp(NOW)
    with engine.connect() as connection:
        recent = connection.execute(text(
            "SELECT customer_id, status FROM sends WHERE evaluated_at > :since AND evaluated_at <= :cut "
            "AND category = 'marketing' AND status IN ('sent', 'complained', 'bounced', 'held_out') ORDER BY id"),
            {"since": NOW.replace(tzinfo=None) - timedelta(days=5) if engine.dialect.name == "postgresql"
             else stamp(NOW - timedelta(days=5)), "cut": cut}).all()
    rng = random.Random(size.seed + 1)
    day = timedelta(days=1)
    sends, engagements, orders = [], [], []
    for chunk, clicks, bought in history(rng, size, ids, math.ceil(size.sends / DAYS), NOW, day):
        sends += chunk
        engagements += clicks
        orders += bought
    for customer, status in recent:  # a fifth of each earlier mail's five days of buying falls on this day
        if rng.random() < (0.06 if status == "held_out" else 0.08) / 5:
            orders.append(_order(rng, ids, customer, NOW + timedelta(seconds=rng.random() * 86_400)))
    for chunk in other_orders(rng, size, ids, max(0, math.ceil(size.orders / DAYS) - len(orders)), NOW, day):
        orders += chunk
    counts = {"sends": load(engine, "sends", SEND_COLUMNS, sends),
              "engagements": load(engine, "engagements", ENGAGEMENT_COLUMNS, engagements),
              "orders": load(engine, "orders", ORDER_COLUMNS, orders)}
    if engine.dialect.name == "postgresql":
        execute(engine, *(f"SELECT setval(pg_get_serial_sequence('{t}', 'id'), (SELECT max(id) FROM {t}))"
                          for t in ("sends", "engagements", "orders")))
    return counts


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the store is and how big: the options every outcomes benchmark takes."""
    parser.add_argument("--sqlite", type=Path, help="the SQLite file of the store")
    parser.add_argument("--postgres", help="a PostgreSQL URL of the store (its tables are emptied to build it)")
    parser.add_argument("--customers", type=int, help="customers (the rest scales with them); default 1,000,000")
    parser.add_argument("--scale", type=float, default=1.0, help="a fraction of the full size, e.g. 0.01")
    parser.add_argument("--seed", type=int, default=Size.seed)


def store_of(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[Size, list[str]]:
    """The size and the store URLs the options name (at least one, or the parser says so)."""
    size = Size(args.customers or round(1_000_000 * args.scale), args.seed)
    urls = ([f"sqlite:///{args.sqlite}"] if args.sqlite else []) + ([args.postgres] if args.postgres else [])
    if not urls:
        parser.error("say where: --sqlite PATH and/or --postgres URL")
    return size, urls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_store_arguments(parser)
    args = parser.parse_args()
    size, urls = store_of(parser, args)
    for url in urls:
        print(f"{url.split(':')[0]}: {size.customers:,} customers")
        began = time.perf_counter()
        figures = build(url, size)
        print(f"  built in {time.perf_counter() - began:.0f} s: {figures['rows']}")


if __name__ == "__main__":
    main()
