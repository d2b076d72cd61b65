"""Throughput benchmark against real SMTP peers (Postfix's smtp-sink and smtp-source).

    python bench/run.py [--customers N] [--naive N] [--databases sqlite,postgresql]

Measures, in one run:
1. the ceiling: Postfix's C smtp-source blasting the same sink with same-size messages;
2. Lifecycle end to end: the win-back campaign over the whole store
   (audience → render per stage → MIME → SMTP → ledger), messages per second;
3. a naive baseline: one Prefect task per recipient, email.message.EmailMessage and a
   new SMTP connection per mail (on --naive recipients);
4. audience query time for every shipped trigger, on each database;
5. peak resident memory of the end-to-end run.

Prints a table and writes bench/results.json. Needs Debian's `postfix` package
(smtp-sink, smtp-source) and, for PostgreSQL, the server at 127.0.0.1:5432.
"""

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

NOW = datetime(2026, 3, 16, 12, 0, tzinfo=timezone.utc)  # a Monday, daytime in Europe
POSTGRES_URL = os.environ.get("LIFECYCLE_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
CHUNK = 20_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def smtp_sink():
    """Postfix's smtp-sink on a free loopback port: accepts and discards everything."""
    binary = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    if not Path(binary).exists():
        sys.exit("smtp-sink not found: apt-get install postfix")
    port = free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    process = subprocess.Popen([binary, *user, f"127.0.0.1:{port}", "1000"], stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    try:
        yield port
    finally:
        process.terminate()
        process.wait()


def ceiling(port: int, count: int, size: int) -> float:
    binary = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    start = time.perf_counter()
    subprocess.run([binary, "-d", "-s", "4", "-l", str(size), "-m", str(count), "-f", "hello@shop.example",
                    "-t", "kunde@example.de", f"127.0.0.1:{port}"], check=True, stdout=subprocess.DEVNULL)
    return count / (time.perf_counter() - start)


def seed(url: str, customers: int) -> None:
    """A synthetic store, bulk-inserted: customers in every stage, orders, carts, complaints."""
    from sqlalchemy import insert

    from models import Cart, CartItem, Complaint, Customer, Order
    from models.db import create_schema, make_engine

    engine = make_engine(url)
    create_schema(engine)
    rng = random.Random(1)
    with engine.begin() as connection:
        for first in range(1, customers + 1, CHUNK):
            ids = range(first, min(first + CHUNK, customers + 1))
            connection.execute(insert(Customer), [{
                "id": i, "external_id": f"c{i}", "email": f"kunde{i}@example.de", "first_name": "Jürgen",
                "last_name": "Groß", "locale": "de-DE" if i % 2 else "en-GB", "timezone": "Europe/Berlin",
                "marketing_consent": i % 10 != 0, "created_at": NOW - timedelta(days=400 + i % 900),
                "last_seen_at": NOW - timedelta(days=i % 200),
            } for i in ids])
            orders = []
            for i in ids:
                for n in range(i % 4):  # 0–3 orders: prospects, new, active, at risk, lapsed
                    orders.append({"external_id": f"o{i}-{n}", "customer_id": i, "total_cents": 2000 + i % 9000,
                                   "placed_at": NOW - timedelta(days=rng.choice([10, 90, 200, 400, 600]) + n),
                                   "currency": "EUR", "products": []})
            connection.execute(insert(Order), orders)
            carts = [{"id": i, "external_id": f"cart{i}", "customer_id": i, "status": "open",
                      "created_at": NOW - timedelta(hours=5), "updated_at": NOW - timedelta(hours=3)}
                     for i in ids if i % 10 == 3]
            if carts:
                connection.execute(insert(Cart), carts)
                connection.execute(insert(CartItem), [{"cart_id": c["id"], "product_id": "p1", "name": "Rucksack",
                                                       "price_cents": 9900, "quantity": 1} for c in carts])
            complaints = [{"external_id": f"k{i}", "customer_id": i, "subject": "Paket",
                           "received_at": NOW - timedelta(hours=2)} for i in ids if i % 100 == 7]
            if complaints:
                connection.execute(insert(Complaint), complaints)
    with engine.begin() as connection:
        # A live store has planner statistics (autovacuum); a bulk load has none until this.
        connection.exec_driver_sql("ANALYZE")
    engine.dispose()


def reset_postgres() -> None:
    from sqlalchemy import text
    from sqlmodel import SQLModel

    import models  # noqa: F401
    from models.db import make_engine

    engine = make_engine(POSTGRES_URL)
    SQLModel.metadata.drop_all(engine)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE IF EXISTS alembic_version, apscheduler_jobs"))
    engine.dispose()


def audience_seconds(url: str) -> dict[str, float]:
    from flows.audience import stream_candidates
    from flows.pipeline import load, prepare_job
    from flows.settings import Settings
    from models.db import get_engine

    settings = Settings(database_url=url, triggers_dir=ROOT / "triggers", templates_dir=ROOT / "templates")
    project = load(settings)
    timings = {}
    for name in sorted(project.triggers):
        job = prepare_job(name, NOW, settings=settings, project=project)
        start = time.perf_counter()
        for _ in stream_candidates(get_engine(url), job.trigger, job.kind, job.stages, NOW, 5000, "en", job.policy):
            pass
        timings[job.kind.name] = round(time.perf_counter() - start, 3)
    return timings


END_TO_END = """
import json, os, resource, sys, time
sys.path.insert(0, {root!r})
from datetime import datetime
from flows.pipeline import execute, prepare_job
from flows.settings import get_settings
job = prepare_job("winback-lapsed", datetime.fromisoformat({now!r}), settings=get_settings())
start = time.perf_counter()
summary = execute(job)
elapsed = time.perf_counter() - start
print(json.dumps({{"sent": summary.outcomes["sent"], "seconds": elapsed,
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def end_to_end(url: str, port: int) -> dict:
    """The real engine in a fresh process (so its peak memory is its own)."""
    env = {**os.environ, "LIFECYCLE_DATABASE_URL": url, "LIFECYCLE_SMTP_URL": f"smtp://127.0.0.1:{port}?connections=4",
           "LIFECYCLE_TRIGGERS_DIR": str(ROOT / "triggers"), "LIFECYCLE_TEMPLATES_DIR": str(ROOT / "templates"),
           "LIFECYCLE_BATCH_SIZE": "2000", "LIFECYCLE_IN_FLIGHT": "200"}
    out = subprocess.run([sys.executable, "-c", END_TO_END.format(root=str(ROOT), now=NOW.isoformat())], env=env,
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["msgs_per_s"] = result["sent"] / result["seconds"]
    return result


NAIVE = """
import smtplib, sys, time
from email.message import EmailMessage
from prefect import flow, task
PORT, COUNT = {port}, {count}

@task
def send_one(i: int) -> None:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "hello@shop.example", f"kunde{{i}}@example.de", "Wir vermissen dich"
    msg.set_content("Hallo Jürgen, " * 100)
    msg.add_alternative("<p>Hallo Jürgen</p>" * 100, subtype="html")
    with smtplib.SMTP("127.0.0.1", PORT) as smtp:
        smtp.send_message(msg)

@flow
def naive() -> None:
    for i in range(COUNT):
        send_one(i)

naive()  # the temporary Prefect server starts before the first task
start = time.perf_counter()
naive()
print(COUNT / (time.perf_counter() - start))
"""


def naive(port: int, count: int) -> float:
    out = subprocess.run([sys.executable, "-c", NAIVE.format(port=port, count=count)], capture_output=True,
                         text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--naive", type=int, default=300, help="recipients for the naive baseline")
    parser.add_argument("--databases", default="sqlite,postgresql")
    args = parser.parse_args()
    results: dict = {"cores": os.cpu_count(), "customers": args.customers, "audience_seconds": {},
                     "peak_rss_mb": {}}
    with tempfile.TemporaryDirectory() as folder, smtp_sink() as port:
        print(f"Seeding {args.customers:,} customers …", flush=True)
        urls = {}
        for database in args.databases.split(","):
            url = f"sqlite:///{folder}/bench.db" if database == "sqlite" else POSTGRES_URL
            if database == "postgresql":
                reset_postgres()
            start = time.perf_counter()
            seed(url, args.customers)
            print(f"  {database}: {time.perf_counter() - start:.1f} s", flush=True)
            urls[database] = url
            results["audience_seconds"][f"{database}/{args.customers}"] = audience_seconds(url)
        e2e = end_to_end(urls[args.databases.split(",")[0]], port)
        results["e2e_msgs_per_s"] = round(e2e["msgs_per_s"], 1)
        results["e2e_sent"] = e2e["sent"]
        results["peak_rss_mb"][str(args.customers)] = round(e2e["peak_rss_mb"], 1)
        results["ceiling_msgs_per_s"] = round(ceiling(port, 20_000, 6_000), 1)
        results["naive_msgs_per_s"] = round(naive(port, args.naive), 1)
    results["e2e_vs_ceiling"] = round(results["e2e_msgs_per_s"] / results["ceiling_msgs_per_s"], 3)
    results["e2e_vs_naive"] = round(results["e2e_msgs_per_s"] / results["naive_msgs_per_s"], 1)
    (ROOT / "bench" / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'measure':<40} {'value':>12}")
    print(f"{'cores':<40} {results['cores']:>12}")
    print(f"{'end to end (msgs/s)':<40} {results['e2e_msgs_per_s']:>12,.1f}")
    print(f"{'  messages sent':<40} {results['e2e_sent']:>12,}")
    print(f"{'smtp-source ceiling (msgs/s)':<40} {results['ceiling_msgs_per_s']:>12,.1f}")
    print(f"{'naive baseline (msgs/s)':<40} {results['naive_msgs_per_s']:>12,.1f}")
    print(f"{'end to end / ceiling':<40} {results['e2e_vs_ceiling']:>12.1%}")
    print(f"{'end to end / naive':<40} {results['e2e_vs_naive']:>11.1f}x")
    print(f"{'peak RSS of the run (MB)':<40} {results['peak_rss_mb'][str(args.customers)]:>12,.1f}")
    for key, timings in results["audience_seconds"].items():
        for kind, seconds in timings.items():
            print(f"{'audience ' + kind + ' (' + key + ') s':<40} {seconds:>12.3f}")
    print("\nwrote bench/results.json")


if __name__ == "__main__":
    main()
