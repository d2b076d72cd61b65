"""The tracking API under load: events/s that ``lifecycle web`` commits into PostgreSQL, then ``lifecycle ingest``.

    python bench/collect.py                      # 100,000 customers, wrk -t2 -c16 for 60 s, 2 workers
    python bench/collect.py --quick              # 10,000 customers, 10 s: a smoke test
    python bench/collect.py --connections 32 --workers 2 --seconds 120 --no-access-log

A live shop's store: ``--database-url``'s database is dropped, made anew, migrated (as
``lifecycle db upgrade``) and seeded by COPY with ``--customers`` customers and their
history (``bench/store.py``: orders, about ten events each, open carts, sends). Then
``lifecycle web --workers W`` runs as in production, with a write key, and wrk
(``bench/collect.lua``) posts ``/v1/batch`` requests of ``--batch`` events each, as
Segment's analytics-python uploads them (``{"batch": [...], "sentAt": ..., "writeKey": ...}``,
basic auth): 40 % page, 25 % Product Viewed, 10 % Product Added, 2 % Product Removed,
2 % Order Completed (each a new order), 16 % identify (email, first name, locale,
consent), 5 % other tracks; userIds of seeded customers, except ``--anonymous`` new visitors.

Printed: events/s accepted (the 200s' ``accepted`` over wrk's duration), p50/p99
latency, every other status (503s apart), the server processes' RSS summed (the uvicorn
parent and its workers) sampled each second, first/middle/last/peak, and the CPU time the
server spent per event. Then the store is counted: every accepted event is stored; the
only others are those of requests still in flight when wrk stopped (at most
``--connections`` requests). Last, the same number of such events, with new messageIds,
goes through ``lifecycle ingest FILE.jsonl`` into the same store, timed.

``lifecycle web`` writes uvicorn's access log at level info (it cannot be turned off
from outside); ``--no-access-log`` runs the same app through uvicorn's own command
without it, to see what the log costs.
"""

import argparse
import base64
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import make_url, text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.clicks import cpu_seconds, group_stats, serving
from bench.clicks import fresh_store as empty_store
from bench.store import TABLES, grow
from flows.surfaces.outbox import free_port
from models.db import make_engine

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/bench_collect"
SOURCE, WRITE_KEY = "bench-shop", "bench-write-key-0123456789"
SECRET = "bench-secret-0123456789abcdef"
LIBRARY = {"name": "analytics-python", "version": "2.4.0"}
# The ids are JSON values (a string or null): their slots include the quotes.
SLOTS = {"@@MID@@": 1, '"@@UID@@"': 2, "@@TS@@": 3, "@@PID@@": 4, "@@EMAIL@@": 5, '"@@AID@@"': 6}


def _event(kind: str, **fields: object) -> dict[str, object]:
    """An event as analytics-python enqueues it (its keys, in its order), slots to fill."""
    return {"integrations": {}, "anonymousId": "@@AID@@", "timestamp": "@@TS@@",
            "context": {"library": LIBRARY, "ip": "203.0.113.7", "locale": "de-DE"}, "type": kind,
            "userId": "@@UID@@", **fields, "messageId": "@@MID@@"}


def _product(**extra: object) -> dict[str, object]:
    return {"product_id": "@@PID@@", "name": "Wanderrucksack „Alpin“ 30 l", "price": 99.0, "quantity": 1,
            "currency": "EUR", "url": "https://shop.example/p/@@PID@@",
            "image_url": "https://cdn.shop.example/p/@@PID@@.jpg", **extra}


# (share in percent, event): the mix of a shop's storefront and backend.
MIX: tuple[tuple[int, dict[str, object]], ...] = (
    (40, _event("page", name="Produkt", properties={"url": "https://shop.example/p/@@PID@@", "path": "/p/@@PID@@",
                                                   "title": "Wanderrucksack „Alpin“ 30 l", "referrer": ""})),
    (25, _event("track", event="Product Viewed", properties=_product())),
    (10, _event("track", event="Product Added", properties=_product())),
    (2, _event("track", event="Product Removed", properties=_product())),
    (2, _event("track", event="Order Completed",
               properties={"order_id": "o-@@MID@@", "total": 99.0, "revenue": 84.03, "currency": "EUR",
                           "products": [_product()]})),
    (16, _event("identify", traits={"email": "@@EMAIL@@", "first_name": "Anna", "locale": "de-DE",
                                    "marketing_consent": True})),
    (2, _event("track", event="Checkout Started", properties={"value": 99.0, "currency": "EUR"})),
    (2, _event("track", event="Products Searched", properties={"query": "rucksack"})),
    (1, _event("track", event="Cart Viewed", properties={"cart_id": None})),
)
assert sum(share for share, _ in MIX) == 100


def templates() -> list[list[str | int]]:
    """Each event of the mix as literal pieces and slot numbers (see bench/collect.lua)."""
    result = []
    for _, event in MIX:
        body = json.dumps(event, ensure_ascii=False)
        pieces: list[str | int] = []
        for piece in re.split(r'("@@(?:UID|AID)@@"|@@[A-Z]+@@)', body):
            if piece in SLOTS:
                pieces.append(SLOTS[piece])
            elif piece:
                pieces.append(piece)
        result.append(pieces)
    return result


def deck(seed: int = 17) -> list[int]:
    """Template numbers (1-based) in the mix's proportions, shuffled: 100 events in every 100."""
    cards = [number for number, (share, _) in enumerate(MIX, 1) for _ in range(share)]
    random.Random(seed).shuffle(cards)
    return cards


def _lua(value: str | int) -> str:
    if isinstance(value, int):
        return str(value)
    return '"' + "".join(f"\\{ord(c):03d}" if c in '"\\' or ord(c) < 32 else c for c in value) + '"'


def lua_templates(path: Path) -> None:
    pieces = ",\n".join("{" + ", ".join(_lua(p) for p in template) + "}" for template in templates())
    path.write_text(f"return {{templates = {{\n{pieces}\n}}, deck = {{{', '.join(map(str, deck()))}}}}}\n",
                    encoding="utf-8")


def jsonl(path: Path, count: int, customers: int, anonymous: float) -> None:
    """``count`` events of the same mix, one per line, with messageIds the HTTP run never used."""
    pieces, cards, rng = templates(), deck(), random.Random(1)
    start = datetime.now(UTC) - timedelta(milliseconds=count)  # an export: one event a millisecond
    with path.open("w", encoding="utf-8") as out:
        for n in range(count):
            if rng.random() < anonymous:
                visitor = f"vi-{rng.randrange(1_000_000)}"
                user, visitor, email = "null", f'"{visitor}"', f"{visitor}@example.com"
            else:
                c = rng.randint(1, customers)
                user, visitor, email = f'"c{c}"', "null", f"kunde{c}@example.de"
            ts = (start + timedelta(milliseconds=n)).isoformat(timespec="milliseconds")
            slot = {1: f"i-{n}", 2: user, 3: ts, 4: f"p{rng.randint(1, 5000)}", 5: email, 6: visitor}
            out.write("".join(slot[p] if isinstance(p, int) else p for p in pieces[cards[n % len(cards)] - 1]))
            out.write("\n")


def pace(batches: int = 300) -> float:
    """Microseconds to read one event of a fixed batch of the mix (``flows.collect.read_body``,
    pure Python, one core): a yardstick printed with the figures, since this machine's speed
    drifts by up to half between runs."""
    from flows.collect import read_body

    sample = Path(tempfile.mkdtemp(prefix="bench-pace-")) / "events.jsonl"
    jsonl(sample, 100, 1000, 0.05)
    body = ('{"batch": [' + ", ".join(sample.read_text(encoding="utf-8").splitlines()) + '], "sentAt": "'
            + datetime.now(UTC).isoformat() + '"}').encode()
    shutil.rmtree(sample.parent)
    now = datetime.now(UTC)
    read_body("batch", body, SOURCE, now)
    started = time.process_time()
    for _ in range(batches):
        read_body("batch", body, SOURCE, now)
    return 1e6 * (time.process_time() - started) / (batches * 100)


def fresh_store(url: str, customers: int) -> dict[str, int]:
    """Drop and remake the database, migrate it, and seed a shop of ``customers``; rows per table."""
    if make_url(url).get_backend_name() != "postgresql":
        raise SystemExit("--database-url: a PostgreSQL URL (its database is dropped and made anew)")
    empty_store(url)  # dropped, made anew, the schema as `lifecycle db upgrade` makes it
    engine = make_engine(url)
    counts = grow(engine, 1, customers, datetime.now(UTC))
    with engine.begin() as connection:  # the load gave explicit ids: new rows continue after them
        for table, (columns, _) in TABLES.items():
            if "id" in columns:
                connection.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                                        f"(SELECT coalesce(max(id), 0) + 1 FROM {table}), false)"))
    engine.dispose()
    return counts


def events_of(url: str, source: str) -> int:
    engine = make_engine(url)
    with engine.connect() as connection:
        count = connection.execute(text("SELECT count(*) FROM events WHERE source = :s"), {"s": source}).scalar_one()
    engine.dispose()
    return int(count)


def environment(url: str, folder: Path) -> dict[str, str]:
    triggers = folder / "triggers"
    triggers.mkdir(exist_ok=True)
    shutil.copy(ROOT / "triggers" / "policy.yaml", triggers / "policy.yaml")
    return {**os.environ, "LIFECYCLE_DATABASE_URL": url, "LIFECYCLE_WRITE_KEYS": f"{SOURCE}:{WRITE_KEY}",
            "LIFECYCLE_SECRET": SECRET, "LIFECYCLE_TRIGGERS_DIR": str(triggers),
            "LIFECYCLE_TEMPLATES_DIR": str(ROOT / "templates"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PYTHONUNBUFFERED": "1"}


def lifecycle_bin() -> str:
    return shutil.which("lifecycle") or str(Path(sys.executable).parent / "lifecycle")


def start_web(env: dict[str, str], port: int, workers: int, access_log: bool, log: Path) -> subprocess.Popen[bytes]:
    command = [lifecycle_bin(), "web", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    if not access_log:  # the same app as `lifecycle web --workers` serves, without uvicorn's access log
        command = [sys.executable, "-m", "uvicorn", "--factory", "flows.surfaces.web:app_from_environment",
                   "--host", "127.0.0.1", "--port", str(port), "--no-server-header", "--no-access-log",
                   "--log-level", "warning", *(["--workers", str(workers)] if workers > 1 else [])]
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    processes = workers + 1 if workers > 1 else 1  # uvicorn's parent and every worker
    return serving(process, port, log, lambda: len(group_pids(process.pid)) >= processes)


def group_pids(group: int) -> list[int]:
    return list(group_stats(group))


def group_rss_mb(group: int) -> float:
    page, total = os.sysconf("SC_PAGE_SIZE"), 0
    for pid in group_pids(group):
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
        except OSError:
            continue
    return total / 2**20


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of every core since boot."""
    fields = [float(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


class RssSampler(threading.Thread):
    def __init__(self, group: int) -> None:
        super().__init__(daemon=True)
        self.group, self.samples, self.stopped = group, list[float](), threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.samples.append(group_rss_mb(self.group))
            self.stopped.wait(1.0)


RESULT = re.compile(r"RESULT requests=(?P<requests>\d+) ok=(?P<ok>\d+) unavailable=(?P<unavailable>\d+) "
                    r"other=(?P<other>\d+) socket_errors=(?P<socket_errors>\d+) accepted=(?P<accepted>\d+) "
                    r"duplicates=(?P<duplicates>\d+) refused=(?P<refused>\d+) seconds=(?P<seconds>[\d.]+) "
                    r"p50_ms=(?P<p50>[\d.]+) p99_ms=(?P<p99>[\d.]+) max_ms=(?P<max>[\d.]+)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", default=DEFAULT_URL,
                        help=f"a PostgreSQL URL; its database is dropped and made anew (default {DEFAULT_URL})")
    parser.add_argument("--customers", type=int, help="seeded customers (default 100,000; --quick 10,000)")
    parser.add_argument("--seconds", type=int, help="wrk's duration (default 60; --quick 10)")
    parser.add_argument("--connections", type=int, default=16, help="wrk's connections (default 16)")
    parser.add_argument("--threads", type=int, default=2, help="wrk's threads (default 2)")
    parser.add_argument("--workers", type=int, default=2, help="lifecycle web --workers (default 2)")
    parser.add_argument("--batch", type=int, default=100, help="events a request (default 100, as analytics-python)")
    parser.add_argument("--anonymous", type=float, default=0.05, help="share of events from new visitors")
    parser.add_argument("--no-access-log", action="store_true", help="serve without uvicorn's access log")
    parser.add_argument("--no-ingest", action="store_true", help="skip the lifecycle ingest comparison")
    parser.add_argument("--quick", action="store_true", help="10,000 customers, 10 s: a smoke test")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, scripts, .jsonl)")
    args = parser.parse_args()
    customers = args.customers or (10_000 if args.quick else 100_000)
    seconds = args.seconds or (10 if args.quick else 60)
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install -y wrk)")

    load = os.getloadavg()
    print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"on {os.cpu_count()} cores; pace: {pace():.1f} µs to read an event of the mix (the same work every "
          "run: this machine's speed drifts, and the figures below with it)", flush=True)
    folder = Path(tempfile.mkdtemp(prefix="bench-collect-"))
    url = args.database_url
    try:
        started = time.perf_counter()
        counts = fresh_store(url, customers)
        print(f"store: {make_url(url).render_as_string(hide_password=True)}, seeded in "
              f"{time.perf_counter() - started:.1f} s: " + ", ".join(f"{n:,} {t}" for t, n in counts.items()),
              flush=True)
        script = folder / "templates.lua"
        lua_templates(script)
        env = environment(url, folder)
        port, log = free_port(), folder / "web.log"
        web = start_web(env, port, args.workers, not args.no_access_log, log)
        authorization = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
        command = [wrk, f"-t{args.threads}", f"-c{args.connections}", f"-d{seconds}s", "--latency", "--timeout",
                   "30s", "-s", str(ROOT / "bench" / "collect.lua"), f"http://127.0.0.1:{port}", "--", str(script),
                   str(customers), str(args.batch), str(args.anonymous), authorization, WRITE_KEY]
        print(f"server: {'uvicorn --no-access-log' if args.no_access_log else 'lifecycle web'} --workers "
              f"{args.workers}; $ wrk -t{args.threads} -c{args.connections} -d{seconds}s --latency "
              f"-s bench/collect.lua (batches of {args.batch})", flush=True)
        sampler = RssSampler(web.pid)
        try:
            cpu_before, busy_before = cpu_seconds(web.pid), machine_busy()
            sampler.start()
            answer = subprocess.run(command, capture_output=True, text=True, check=True)
            sampler.stopped.set()
            sampler.join()
            cpu = cpu_seconds(web.pid) - cpu_before
            busy_after = machine_busy()
        finally:
            web.send_signal(signal.SIGTERM)  # uvicorn finishes its requests; the writers drain their queues
            web.wait(60)
        found = RESULT.search(answer.stdout)
        if found is None:
            raise SystemExit(f"wrk said:\n{answer.stdout}\n{answer.stderr}")
        r = {k: float(v) if k in ("seconds", "p50", "p99", "max") else int(v) for k, v in found.groupdict().items()}
        rate = r["accepted"] / r["seconds"]
        samples = sampler.samples or [0.0]
        busy = (busy_after[0] - busy_before[0]) / max(busy_after[1] - busy_before[1], 1)
        print(f"accepted: {rate:,.0f} events/s ({r['accepted']:,} events in {r['ok']:,} answers 200 in "
              f"{r['seconds']:.1f} s; {r['ok'] / r['seconds']:.1f} requests/s)")
        print(f"latency: p50 {r['p50']:.0f} ms, p99 {r['p99']:.0f} ms, max {r['max']:.0f} ms")
        print(f"not 200: {r['unavailable']} answers 503, {r['other']} other answers, {r['socket_errors']} socket "
              f"errors; in the 200s: {r['duplicates']} duplicates, {r['refused']} events refused")
        for line in answer.stdout.splitlines():
            if line.startswith("SAMPLE "):
                print(f"  first answer not clean: {line[7:]}")
        who = f"parent + {args.workers} workers" if args.workers > 1 else "one process"
        print(f"server RSS ({who}, every second, {len(samples)} samples): first "
              f"{samples[0]:.0f} MB, middle {samples[len(samples) // 2]:.0f} MB, last {samples[-1]:.0f} MB, "
              f"peak {max(samples):.0f} MB")
        print(f"server CPU: {cpu:.1f} s, {cpu * 1e6 / max(r['accepted'], 1):,.0f} µs an event; machine busy "
              f"{busy:.0%} of {os.cpu_count()} cores (server, PostgreSQL, wrk and anything else)")
        stored = events_of(url, SOURCE)
        in_flight = stored - r["accepted"]
        clean = 0 <= in_flight <= args.connections * args.batch and not r["duplicates"]
        print(f"stored: {stored:,} events from the API = {r['accepted']:,} accepted + {in_flight:,} of requests "
              f"in flight when wrk stopped ({in_flight / args.batch:.0f} requests, at most {args.connections})"
              if clean else f"STORED {stored:,} EVENTS, BUT {r['accepted']:,} WERE ACCEPTED")
        if not args.no_ingest:
            ingest(url, env, folder, r["accepted"], customers, args.anonymous)
        problems = r["unavailable"] + r["other"] + r["socket_errors"] + r["refused"]
        if not clean or problems:
            print(log.read_text(encoding="utf-8", errors="replace")[-3000:])
            raise SystemExit(1)
    finally:
        if args.keep:
            print(f"kept: {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


def ingest(url: str, env: dict[str, str], folder: Path, count: int, customers: int, anonymous: float) -> None:
    """``lifecycle ingest`` of ``count`` events of the same mix into the same store, timed."""
    lines, empty = folder / "events.jsonl", folder / "empty.jsonl"
    jsonl(lines, count, customers, anonymous)
    empty.write_text("")
    began = time.perf_counter()
    subprocess.run([lifecycle_bin(), "ingest", str(empty)], env=env, cwd=ROOT, check=True, capture_output=True)
    startup = time.perf_counter() - began
    before = events_of(url, "ingest")
    began = time.perf_counter()
    done = subprocess.run([lifecycle_bin(), "ingest", str(lines)], env=env, cwd=ROOT, capture_output=True, text=True)
    took = time.perf_counter() - began
    loaded = events_of(url, "ingest") - before
    print(f"lifecycle ingest: {count:,} events ({lines.stat().st_size / 2**20:.0f} MB) in {took:.1f} s: "
          f"{count / took:,.0f} events/s ({count / max(took - startup, 0.1):,.0f}/s without the "
          f"{startup:.1f} s the command takes to start); {loaded:,} stored")
    if done.returncode or loaded != count:
        raise SystemExit(f"lifecycle ingest: exit {done.returncode}, {loaded} of {count} stored\n"
                         f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


if __name__ == "__main__":
    main()
