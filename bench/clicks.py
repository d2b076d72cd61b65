"""Redirects a second of ``lifecycle web``'s click endpoint under wrk, and proof that no click was lost.

    python bench/clicks.py                                  # SQLite file, 5,000 sends, wrk -t2 -c64 -d10s
    python bench/clicks.py --database postgresql://postgres@127.0.0.1:5432/bench_clicks
    python bench/clicks.py --sends 20000 --duration 30 --connections 128

Builds a fresh store with ``--sends`` marketing mails of two tracked links each (direct
inserts, sent a day ago, so no click is "too soon"), starts ``lifecycle web`` as it runs in
production (the CLI, uvicorn, the access log on), and runs wrk with a Lua script that walks
through every token of every mail, each wrk thread from its own offset: most requests are
a new click, the rest repeats folded into one (``flows.tracking.clicks``). Then it stops the
server (which drains its queue) and counts:

- answered: requests wrk saw answered 302; non-302: every other answer or socket error;
- logged: 302 lines in the server's access log (written after each response went out);
- recorded: sum(1 + repeats) over the engagements.

No click is lost when answered <= logged <= recorded: every redirect sent is a click
stored, since each is committed before its 302. wrk stops with up to ``--connections``
requests in flight, which the server recorded but could no longer answer (nor log).
The server's CPU time per redirect is printed too: on a shared machine it says more than
the rate.
"""

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import httpx
from sqlalchemy import create_engine, func, insert, make_url, select, text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flows.content.links import click_token, send_digest
from flows.surfaces.outbox import free_port
from models import Customer, Engagement, Send
from models.db import create_schema, make_engine
from models.types import utcnow

SECRET = "bench-secret-0123456789abcdef"
BROWSER = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36"
LINKS = ("https://shop.example/p/{n}?ref=mail", "https://shop.example/cart#top")

LUA = """
tokens = {%(tokens)s}
local threads = {}
function setup(thread)
  table.insert(threads, thread)
  thread:set("offset", (#threads - 1) * %(stride)d)
end
function init(args)
  i = offset
end
function request()
  i = i + 1
  return wrk.format("GET", "/c/" .. tokens[(i %% #tokens) + 1], {["User-Agent"] = "%(agent)s"})
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT requests=%%d status_errors=%%d socket_errors=%%d seconds=%%.3f "
    .. "p50_ms=%%.2f p99_ms=%%.2f\\n",
    summary.requests, e.status, e.connect + e.read + e.write + e.timeout, summary.duration / 1e6,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
"""


def fresh_store(url: str) -> None:
    """An empty schema at ``url`` (a PostgreSQL database is dropped and made anew)."""
    if url.startswith("postgresql"):
        parsed = make_url(url)
        admin = create_engine(parsed.set(drivername="postgresql+psycopg", database="postgres"),
                              isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)'))
            connection.execute(text(f'CREATE DATABASE "{parsed.database}"'))
        admin.dispose()
    engine = make_engine(url)
    create_schema(engine)
    engine.dispose()


def seed(url: str, sends: int) -> list[str]:
    """``sends`` customers with one sent marketing mail each; every click token, in order."""
    engine = make_engine(url)
    left = utcnow() - timedelta(days=1)
    customers = [{"external_id": f"c-{n}", "email": f"kunde{n}@example.de", "locale": "de-DE",
                  "marketing_consent": True, "created_at": left} for n in range(sends)]
    tokens: list[str] = []
    with engine.begin() as connection:
        connection.execute(insert(Customer), customers)
        ids = dict(connection.execute(select(Customer.external_id, Customer.id)).all())
        rows = []
        for n in range(sends):
            key = f"bench-campaign/{n}/2026-w01"
            digest = send_digest(SECRET, key)
            rows.append({"send_key": key, "trigger": "bench-campaign", "customer_id": ids[f"c-{n}"],
                         "occurrence": "2026-w01", "category": "marketing", "status": "sent", "run_id": "bench",
                         "stage": "active", "template": "winback/default.de.html.j2", "email": f"kunde{n}@example.de",
                         "message_id": f"<{digest}@shop.example>", "evaluated_at": left, "claimed_at": left,
                         "finished_at": left, "links": "\n".join(link.format(n=n) for link in LINKS)})
            tokens.extend(click_token(SECRET, digest, link) for link in range(len(LINKS)))
        connection.execute(insert(Send), rows)
    with engine.connect() as connection:  # fresh statistics, as autovacuum would soon have them
        connection.execute(text("ANALYZE"))
        connection.commit()
    engine.dispose()
    return tokens


def start_web(url: str, port: int, log: Path, triggers: Path, workers: int = 1) -> subprocess.Popen[bytes]:
    environment = {**os.environ, "LIFECYCLE_DATABASE_URL": url, "LIFECYCLE_SECRET": SECRET,
                   "LIFECYCLE_TRIGGERS_DIR": str(triggers), "LIFECYCLE_TEMPLATES_DIR": str(ROOT / "templates"),
                   "LIFECYCLE_BASE_URL": f"http://127.0.0.1:{port}", "PYTHONUNBUFFERED": "1"}
    lifecycle = shutil.which("lifecycle") or str(Path(sys.executable).parent / "lifecycle")
    command = [lifecycle, "web", "--host", "127.0.0.1", "--port", str(port)]
    if workers > 1:  # uvicorn's own command, as ``lifecycle web --workers`` would run it
        command = [sys.executable, "-m", "uvicorn", "--factory", "flows.surfaces.web:app_from_environment",
                   "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers), "--no-server-header",
                   "--log-config", str(_log_config(log.parent))]
    process = subprocess.Popen(command, env=environment, cwd=ROOT,
                               stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    return serving(process, port, log)


def serving(process: subprocess.Popen[bytes], port: int, log: Path,
            ready: Callable[[], bool] = lambda: True) -> subprocess.Popen[bytes]:
    """``process`` once it answers ``/healthz`` on ``port`` and ``ready()`` holds (within 90 s);
    its log in the error if it ends or never gets there."""
    deadline = time.monotonic() + 90
    while True:
        if process.poll() is not None:
            raise SystemExit(f"lifecycle web ended:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200 and ready():
                return process
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"lifecycle web did not start:\n{log.read_text()}")
        time.sleep(0.2)


def _log_config(folder: Path) -> Path:
    import json

    from flows.surfaces.web_security import log_config

    path = folder / "log_config.json"
    config = log_config()
    config["filters"]["redact"] = {"()": "flows.redaction.Redacting"}
    path.write_text(json.dumps(config))
    return path


def group_stats(group: int) -> dict[int, list[str]]:
    """Each live process of process group ``group`` (the server, its workers): its /proc stat
    fields after the command name."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == group:  # pgrp
            found[int(stat.parent.name)] = fields
    return found


def cpu_seconds(group: int) -> float:
    """CPU time (user + system) of every process in process group ``group``."""
    tick = os.sysconf("SC_CLK_TCK")
    return sum((int(fields[11]) + int(fields[12])) / tick for fields in group_stats(group).values())  # utime, stime


def recorded(url: str) -> tuple[int, int]:
    """(rows, clicks): engagements, and sum(1 + repeats) over them."""
    engine = make_engine(url)
    with engine.connect() as connection:
        rows, clicks = connection.execute(
            select(func.count(), func.coalesce(func.sum(1 + Engagement.repeats), 0))).one()
    engine.dispose()
    return int(rows), int(clicks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", help="a PostgreSQL URL (its database is dropped and made anew); "
                        "default: a SQLite file in a temporary folder")
    parser.add_argument("--sends", type=int, default=5000)
    parser.add_argument("--duration", type=int, default=10, help="seconds of wrk")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (store, log, script)")
    args = parser.parse_args()
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install -y wrk)")

    folder = Path(tempfile.mkdtemp(prefix="bench-clicks-"))
    url = args.database or f"sqlite:///{folder / 'store.db'}"
    try:
        fresh_store(url)
        started = time.perf_counter()
        tokens = seed(url, args.sends)
        print(f"store: {make_url(url).get_backend_name()}, {args.sends} sends, {len(tokens)} tracked links "
              f"(seeded in {time.perf_counter() - started:.1f} s)")
        script = folder / "clicks.lua"
        script.write_text(LUA % {"tokens": ",".join(f'"{t}"' for t in tokens), "agent": BROWSER,
                                 "stride": len(tokens) // max(args.threads, 1)})
        triggers = folder / "triggers"
        triggers.mkdir()
        shutil.copy(ROOT / "triggers" / "policy.yaml", triggers / "policy.yaml")
        port, log = free_port(), folder / "web.log"
        web = start_web(url, port, log, triggers, args.workers)
        try:
            command = [wrk, f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s", "--latency",
                       "-s", str(script), f"http://127.0.0.1:{port}/"]
            print("$", " ".join(command[:-3]), "-s clicks.lua", command[-1])
            cpu_before, load_before = cpu_seconds(web.pid), os.getloadavg()[0]
            answer = subprocess.run(command, capture_output=True, text=True, check=True)
            cpu = cpu_seconds(web.pid) - cpu_before
        finally:
            web.send_signal(signal.SIGTERM)  # uvicorn finishes its requests; the click writer drains
            web.wait(60)
        found = re.search(r"RESULT requests=(\d+) status_errors=(\d+) socket_errors=(\d+) seconds=([\d.]+) "
                          r"p50_ms=([\d.]+) p99_ms=([\d.]+)", answer.stdout)
        if found is None:
            raise SystemExit(f"wrk said:\n{answer.stdout}\n{answer.stderr}")
        requests, status_errors, socket_errors = (int(found.group(i)) for i in (1, 2, 3))
        seconds, p50, p99 = float(found.group(4)), float(found.group(5)), float(found.group(6))
        answered = requests - status_errors
        output = log.read_text(encoding="utf-8", errors="replace")
        logged = len(re.findall(r'"GET /c/\S* HTTP/1\.1" 302', output))
        rows, clicks = recorded(url)
        print(f"redirects/s: {answered / seconds:,.0f} ({answered} answered 302 in {seconds:.1f} s; "
              f"latency p50 {p50:.1f} ms, p99 {p99:.1f} ms)")
        print(f"server CPU: {cpu * 1e6 / max(answered, 1):,.0f} µs a redirect ({cpu:.1f} s); "
              f"load average before: {load_before:.1f} on {os.cpu_count()} cores")
        print(f"non-302: {status_errors} answers, {socket_errors} socket errors")
        print(f"recorded: {clicks} clicks in {rows} rows; logged 302: {logged} (the rest: in flight when wrk stopped)")
        lost = not answered <= logged <= clicks <= logged + args.connections or status_errors or socket_errors
        print("no click lost" if not lost else "CLICKS LOST OR REFUSED")
        if lost:
            print(output[-3000:])
            raise SystemExit(1)
    finally:
        if args.keep:
            print(f"kept: {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
