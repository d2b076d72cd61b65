"""A synthetic customer store for the benchmark, bulk-loaded fast on SQLite and PostgreSQL.

Per customer: a profile (half German, half English; 90 % with confirmed consent, some
waiting for double opt-in, a few signed up this week), 0–3 orders spread over two
years (so every lifecycle stage is populated), about ten tracked events over the last
year (Segment's ``Product Viewed``, ``Product Added``, ``Page Viewed`` …), an open cart
for one in ten, a complaint for one in a hundred, and for one in three a send history.

Rows go in through the driver's bulk path — ``executemany`` on SQLite, ``COPY`` on
PostgreSQL — in chunks, so memory stays small however large the store. ``grow`` adds
customers ``first..last``, so a benchmark can measure 10 k, then 100 k, then 1 M
without loading anything twice.
"""

import json
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from itertools import islice
from typing import Any

from sqlalchemy import Engine

CHUNK = 50_000
EVENT_NAMES = ("Product Viewed", "Product Viewed", "Page Viewed", "Product Added", "Product Removed",
               "Checkout Started", "Product Viewed", "Page Viewed")
FIRST_NAMES = ("Jürgen", "Anna", "Émile", "Zoë", "Mehmet", "Ingrid", "Łukasz", "Chloé", "Sven", "Ana")
LAST_NAMES = ("Groß", "Müller", "O'Brien", "Schmidt", "Nguyễn", "Weiß", "García", "Jensen")


class Clock:
    """Timestamps as the store keeps them (naive UTC text), formatted once per hour offset."""

    def __init__(self, now: datetime) -> None:
        self.now = now.replace(tzinfo=None)
        self._cache: dict[int, str] = {}

    def hours_ago(self, hours: int) -> str:
        text = self._cache.get(hours)
        if text is None:
            text = self._cache[hours] = (self.now - timedelta(hours=hours)).strftime("%Y-%m-%d %H:%M:%S.%f")
        return text

    def days_ago(self, days: int) -> str:
        return self.hours_ago(days * 24)


def customers(first: int, last: int, clock: Clock) -> Iterator[tuple]:
    for i in range(first, last + 1):
        confirmed = i % 10 != 0
        requested = clock.days_ago(2) if i % 20 == 0 else None
        signed_up = clock.days_ago(i % 7) if i % 50 == 1 else clock.days_ago(400 + i % 900)
        yield (i, f"c{i}", f"kunde{i}@example.de", FIRST_NAMES[i % 10] if i % 13 else None, LAST_NAMES[i % 8],
               "de-DE" if i % 2 else "en-GB", "Europe/Berlin" if i % 2 else "Europe/London", confirmed,
               clock.days_ago(390) if confirmed else None, "checkout" if confirmed else None, requested,
               signed_up, clock.hours_ago(_last_seen_hours(i)))


def _last_seen_hours(i: int) -> int:
    return (i * 37) % (24 * 200) + 1


def orders(first: int, last: int, clock: Clock) -> Iterator[tuple]:
    ages = (10, 90, 200, 400, 600)  # new, active, at risk, lapsed …
    for i in range(first, last + 1):
        for n in range(i % 4):
            yield (f"o{i}-{n}", i, clock.days_ago(ages[(i * 7 + n) % 5] + n), 2000 + (i * 31 + n) % 9000, "EUR", "[]")


def events(first: int, last: int, clock: Clock) -> Iterator[tuple]:
    for i in range(first, last + 1):
        newest = _last_seen_hours(i)
        for n in range((i * 13) % 21):  # 0–20, ten on average
            name = EVENT_NAMES[(i + n) % len(EVENT_NAMES)]
            at = clock.hours_ago(newest + n * 29)
            payload = json.dumps({"event": name, "properties": {"product_id": f"p{(i + n) % 5000}"}})
            yield (f"m{i}-{n}", "track", name, f"c{i}", at, payload, at)


def carts(first: int, last: int, clock: Clock) -> Iterator[tuple]:
    for i in range(first + (3 - first) % 10, last + 1, 10):
        yield (i, f"cart{i}", i, "EUR", "open", clock.hours_ago(5), clock.hours_ago(3))


def cart_items(first: int, last: int, clock: Clock) -> Iterator[tuple]:
    for i in range(first + (3 - first) % 10, last + 1, 10):
        yield (i, "p1", "Wanderrucksack „Alpin“ 30 l", 9900, 1, "https://shop.example/p/1", None)


def complaints(first: int, last: int, clock: Clock) -> Iterator[tuple]:
    for i in range(first + (7 - first) % 100, last + 1, 100):
        yield (f"k{i}", i, "Paket beschädigt", clock.hours_ago(2), None)


def sends(first: int, last: int, clock: Clock) -> Iterator[tuple]:
    """A running store's history: every third customer got a we-miss-you mail 45 days ago."""
    at = clock.days_ago(45)
    for i in range(first + (3 - first) % 3, last + 1, 3):
        yield (f"we-miss-you/{i}/bench", "we-miss-you", i, "bench", "marketing", "sent", "bench", "at_risk",
               "we_miss_you/default.html.j2", f"kunde{i}@example.de", "", at, at, at, "250 ok", "")


TABLES: dict[str, tuple[Sequence[str], Any]] = {
    "customers": (("id", "external_id", "email", "first_name", "last_name", "locale", "timezone", "marketing_consent",
                   "consent_at", "consent_source", "consent_requested_at", "created_at", "last_seen_at"), customers),
    "orders": (("external_id", "customer_id", "placed_at", "total_cents", "currency", "products"), orders),
    "events": (("message_id", "type", "name", "user_id", "timestamp", "payload", "received_at"), events),
    "carts": (("id", "external_id", "customer_id", "currency", "status", "created_at", "updated_at"), carts),
    "cart_items": (("cart_id", "product_id", "name", "price_cents", "quantity", "url", "image_url"), cart_items),
    "complaints": (("external_id", "customer_id", "subject", "received_at", "answered_at"), complaints),
    "sends": (("send_key", "trigger", "customer_id", "occurrence", "category", "status", "run_id", "stage",
               "template", "email", "message_id", "evaluated_at", "claimed_at", "finished_at", "smtp_reply", "error"),
              sends),
}


def grow(engine: Engine, first: int, last: int, now: datetime,
         tables: Sequence[str] = tuple(TABLES)) -> dict[str, int]:
    """Add customers ``first..last`` (inclusive) with everything they own (or only the rows of
    ``tables``: customers and orders are enough for a win-back campaign); returns rows per table."""
    clock = Clock(now)
    counts = {}
    for table in tables:
        columns, rows = TABLES[table]
        counts[table] = _load(engine, table, columns, rows(first, last, clock))
    with engine.begin() as connection:
        connection.exec_driver_sql("ANALYZE")  # a live store has planner statistics; a bulk load has none
    return counts


def _load(engine: Engine, table: str, columns: Sequence[str], rows: Iterator[tuple]) -> int:
    total = 0
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        if engine.dialect.name == "postgresql":
            with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
                    total += 1
        else:
            cursor.execute("PRAGMA synchronous=OFF")  # a benchmark store: a crash during the load only loses it
            statement = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
            while chunk := list(islice(rows, CHUNK)):
                cursor.executemany(statement, chunk)
                total += len(chunk)
        raw.commit()
    finally:
        raw.close()
    return total
