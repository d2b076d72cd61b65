"""Throughput benchmark against real SMTP peers (Postfix's smtp-sink and smtp-source).

    python bench/run.py [--customers N] [--naive N] [--databases sqlite,postgresql] [--dkim] [--rtt MS]

Grows a synthetic store (``bench/store.py``: about ten events per customer) through
10,000, 100,000 and 1,000,000 customers, up to ``--customers`` (default 100,000), and
measures in one run:

1. the ceiling: Postfix's C ``smtp-source`` sending messages of the same size to the
   same ``smtp-sink`` as it runs by default (one session: what one SMTP client can do),
   and besides with as many parallel sessions as Lifecycle opens;
2. Lifecycle end to end at each size: the win-back campaign flow over the whole store
   (audience → render per stage → MIME → SMTP → ledger), run as a Prefect flow against
   a Prefect server, as in production; messages per second;
3. a naive baseline: one Prefect task per recipient, ``email.message.EmailMessage``
   and a new SMTP connection per mail;
4. audience time of every trigger kind at each size, on SQLite and PostgreSQL: the whole
   audience read and classified as a run streams it, and its SQL alone;
5. peak memory of the Lifecycle run at each size: the flow's process and its sender
   processes together (sum of RSS; PSS counts shared pages once), and its largest
   single process;
6. for the PostgreSQL run: PostgreSQL's own share of the machine's CPU during the flow
   (``bench.ledger.PostgresCpu``), the share of the ledger's row updates that were HOT,
   and end to end against SQLite's figure in the same run.

Prints a table and writes ``bench/results.json``. Needs Debian's ``postfix`` package
(``smtp-sink``, ``smtp-source``) and, for PostgreSQL, the server at 127.0.0.1:5432.
"""

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from sqlalchemy import make_url

from bench.ledger import PostgresCpu

NOW = datetime(2026, 3, 16, 12, 0, tzinfo=UTC)  # a Monday, daytime in Europe
# A database of its own: the tests empty theirs (`test` and its per-worker copies) as they go.
POSTGRES_URL = os.environ.get("LIFECYCLE_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/bench_run")
SIZES = (10_000, 100_000, 1_000_000)
CONNECTIONS = 4  # SMTP sessions per sender process
BATCH_SIZE = 1000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


def postfix_tool(name: str) -> str:
    found = shutil.which(name) or f"/usr/sbin/{name}"
    if not Path(found).exists():
        sys.exit(f"{name} not found: apt-get install postfix")
    return found


@contextmanager
def smtp_sink() -> Iterator[int]:
    """Postfix's smtp-sink on a free loopback port: accepts and discards everything."""
    port = free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    process = subprocess.Popen([postfix_tool("smtp-sink"), *user, f"127.0.0.1:{port}", "1000"],
                               stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield port
    finally:
        process.terminate()
        process.wait()


@contextmanager
def prefect_server(home: Path) -> Iterator[str]:
    """A Prefect server of its own, so the measured runs pay no temporary-server start."""
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = (home / "server.log").open("wb")
    process = subprocess.Popen([shutil.which("prefect") or "prefect", "server", "start", "--host", "127.0.0.1",
                                "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, timeout=120)
        yield f"http://127.0.0.1:{port}/api"
    finally:
        process.terminate()
        process.wait()


def ceiling(port: int, count: int, size: int, sessions: int) -> float:
    start = time.perf_counter()
    subprocess.run([postfix_tool("smtp-source"), "-d", "-s", str(sessions), "-l", str(size), "-m", str(count),
                    "-f", "hello@shop.example", "-t", "kunde@example.de", f"127.0.0.1:{port}"],
                   check=True, stdout=subprocess.DEVNULL)
    return count / (time.perf_counter() - start)


def reset_postgres() -> None:
    from sqlalchemy import text
    from sqlmodel import SQLModel

    import models  # noqa: F401
    from models.db import make_engine
    from tests.conftest import ensure_database

    ensure_database(POSTGRES_URL)
    engine = make_engine(POSTGRES_URL)
    SQLModel.metadata.drop_all(engine)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE IF EXISTS alembic_version, apscheduler_jobs"))
    engine.dispose()


def audience_seconds(url: str) -> tuple[dict[str, float], dict[str, float]]:
    """Per trigger kind (the slowest of its triggers): the whole audience read and classified
    as a run streams it, and its SQL alone (executed, every row fetched)."""
    from flows.audience.query import audience_query, plain_plans, stream_candidates
    from flows.run_context import load, prepare
    from flows.settings import Settings
    from models.db import get_engine

    settings = Settings(database_url=url, triggers_dir=ROOT / "triggers", templates_dir=ROOT / "templates")
    project = load(settings)
    engine = get_engine(url)
    streamed: dict[str, float] = {}
    queried: dict[str, float] = {}
    for name in sorted(project.triggers):
        job = prepare(name, NOW, settings=settings, project=project)
        kind = job.kind.name
        start = time.perf_counter()
        with engine.connect() as connection:
            plain_plans(connection)  # as a run reads it
            for _ in connection.execute(audience_query(job.trigger, job.kind, job.stages, NOW)):
                pass
        queried[kind] = max(queried.get(kind, 0), round(time.perf_counter() - start, 3))
        start = time.perf_counter()
        for _ in stream_candidates(engine, job.trigger, job.kind, job.stages, NOW, 5000, "en", job.policy):
            pass
        streamed[kind] = max(streamed.get(kind, 0), round(time.perf_counter() - start, 3))
    return streamed, queried


def clear_ledger(url: str) -> None:
    """Forget the previous end-to-end run's sends (the seeded history stays)."""
    from sqlalchemy import text

    from models.db import make_engine

    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM sends WHERE run_id <> 'bench'"))
        connection.execute(text("DELETE FROM suppressions"))
    engine.dispose()


class TreeMemory:
    """Samples the memory of a process and all its descendants every few milliseconds."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_rss, self.peak_pss, self.peak_process_rss = pid, 0, 0, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _tree(self) -> list[int]:
        """The process and its descendants, less children caught between fork and exec:
        such a child still maps its parent's pages, and RSS would count them twice."""
        pids, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            command = self._cmdline(pid)
            for task in Path(f"/proc/{pid}/task").glob("*/children"):
                try:
                    children = [int(child) for child in task.read_text().split()]
                except OSError:
                    continue
                todo.extend(child for child in children if self._cmdline(child) != command)
        return pids

    @staticmethod
    def _cmdline(pid: int) -> bytes:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return b""

    @staticmethod
    def _kib(path: str, field: str) -> int:
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(field):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def _sample(self) -> None:
        while not self._done.wait(0.05):
            pids = self._tree()
            rss = [self._kib(f"/proc/{p}/status", "VmRSS:") for p in pids]
            self.peak_rss = max(self.peak_rss, sum(rss))
            self.peak_process_rss = max(self.peak_process_rss, *rss)
            self.peak_pss = max(self.peak_pss, sum(self._kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids))


END_TO_END = """
import json, sys, time
from flows.surfaces.prefect_flows import trigger_flow

if __name__ == "__main__":
    start = time.perf_counter()
    summary = trigger_flow(trigger="winback-lapsed", now=sys.argv[1])
    elapsed = time.perf_counter() - start
    print(json.dumps({"sent": summary.outcomes["sent"], "seconds": elapsed, "outcomes": summary.outcomes}))
"""


def end_to_end(url: str, port: int, api_url: str, workers: int, extra: dict[str, str] | None = None,
               connections: int = CONNECTIONS) -> dict:
    """The win-back flow in a fresh process, as a worker would run it; its whole tree is measured
    (``extra``: more settings, such as a DKIM key; ``connections``: SMTP sessions per sender)."""
    env = {**os.environ, **(extra or {}), "PREFECT_API_URL": api_url, "LIFECYCLE_DATABASE_URL": url,
           "LIFECYCLE_SMTP_URL": f"smtp://127.0.0.1:{port}?connections={connections}",
           "LIFECYCLE_TRIGGERS_DIR": str(ROOT / "triggers"), "LIFECYCLE_TEMPLATES_DIR": str(ROOT / "templates"),
           "LIFECYCLE_BATCH_SIZE": str(BATCH_SIZE), "LIFECYCLE_IN_FLIGHT": "200", "LIFECYCLE_WORKERS": str(workers),
           "PYTHONPATH": str(ROOT)}
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
        script.write(END_TO_END)
    postgres = url.startswith("postgresql")
    database = make_url(url).database or ""
    updates = sends_updates(url) if postgres else (0, 0)
    try:
        with PostgresCpu(database) if postgres else nullcontext() as cpu:
            process = subprocess.Popen([sys.executable, script.name, NOW.isoformat()], env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            with TreeMemory(process.pid) as memory:
                out, err = process.communicate()
    finally:
        os.unlink(script.name)
    if process.returncode != 0:
        raise RuntimeError(f"end-to-end run failed:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["msgs_per_s"] = result["sent"] / result["seconds"]
    if cpu is not None:
        # Over the flow's own time (its process's start-up asks nothing of PostgreSQL).
        result["postgres_cpu_share"] = cpu.seconds / result["seconds"] / (os.cpu_count() or 1)
        done, hot = (after - before for after, before in zip(sends_updates(url, at_least=updates[0] + 1), updates,
                                                             strict=True))
        result["sends_updates"], result["sends_hot_update_share"] = done, hot / done if done else 0.0
    result["peak_rss_mb"] = memory.peak_rss / 1024
    result["peak_pss_mb"] = memory.peak_pss / 1024
    result["peak_process_rss_mb"] = memory.peak_process_rss / 1024
    return result


def sends_updates(url: str, at_least: int = 0) -> tuple[int, int]:
    """``(updates, HOT updates)`` of the ledger's rows so far, as PostgreSQL counts them; with
    ``at_least``, once they count that many (a backend reports its counts as it ends)."""
    from sqlalchemy import text

    from models.db import make_engine

    engine = make_engine(url)
    deadline = time.monotonic() + 10
    try:
        while True:
            with engine.connect() as connection:
                done, hot = connection.execute(text(
                    "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'sends'")).one()
            if done >= at_least or time.monotonic() > deadline:
                return int(done), int(hot)
            time.sleep(0.1)
    finally:
        engine.dispose()


def dkim_settings() -> dict[str, str]:
    """A fresh RSA-2048 key as a shop would configure it (``LIFECYCLE_DKIM_*``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return {"LIFECYCLE_DKIM_SELECTOR": "bench2026", "LIFECYCLE_DKIM_PRIVATE_KEY": pem}


def signing_cost(pem: str) -> dict[str, float]:
    """What one signature costs: Lifecycle's signer on a win-back mail, in this process, against
    ``openssl speed rsa2048`` (the physical limit: RSA-2048 private-key operations per second)."""
    from flows.message.dkim import DkimKey, DkimSigner

    message = sample_message()
    signer = DkimSigner("shop.example", (DkimKey("bench2026", "rsa-sha256", pem.encode()),))
    signer.sign(message)  # the key is parsed at the first signature
    count, start = 2000, time.perf_counter()
    for _ in range(count):
        signer.sign(message)
    per_message = (time.perf_counter() - start) / count
    out = subprocess.run(["openssl", "speed", "-seconds", "3", "rsa2048"], capture_output=True, text=True,
                         check=True).stdout
    line = next(row for row in out.splitlines() if row.startswith("rsa 2048"))
    signs_per_s = float(line.split()[-2])  # "rsa 2048 bits 0.000695s 0.000021s 1438.8 47619.0": sign/s, verify/s
    return {"lifecycle_sign_us": round(per_message * 1e6, 1), "lifecycle_signs_per_s": round(1 / per_message, 1),
            "openssl_signs_per_s": signs_per_s, "openssl_sign_us": round(1e6 / signs_per_s, 1)}


def sample_message() -> bytes:
    """One win-back mail as Lifecycle builds it (unsigned)."""
    from flows.content.context import sample_contexts
    from flows.message.compose import Sender, build_message, message_id
    from flows.run_context import load
    from flows.settings import Settings

    settings = Settings(triggers_dir=ROOT / "triggers", templates_dir=ROOT / "templates")
    project = load(settings)
    trigger = project.trigger("winback-lapsed")
    context = {**sample_contexts(None, settings.base_url, settings.shop_url)[0], "stage": "lapsed", "lang": "de"}
    rendered = project.catalog.render(trigger.email, context)
    sender = Sender.parse(settings.sender)
    return build_message(rendered, sender=sender, to_address="kunde1@example.de", to_name="Jürgen Groß",
                         msg_id=message_id("x", sender, secrets.token_urlsafe(32)), date=NOW)


def message_size() -> int:
    """The size of one win-back mail as Lifecycle builds it, for smtp-source to match."""
    return len(sample_message())


NAIVE = """
import smtplib, sys, time
from email.message import EmailMessage
from prefect import flow, task
PORT, COUNT, SIZE = {port}, {count}, {size}

@task
def send_one(i: int) -> None:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "hello@shop.example", f"kunde{{i}}@example.de", "Wir vermissen dich"
    msg.set_content("Hallo Jürgen, " * (SIZE // 60))
    msg.add_alternative("<p>Hallo Jürgen</p>" * (SIZE // 60), subtype="html")
    with smtplib.SMTP("127.0.0.1", PORT) as smtp:
        smtp.send_message(msg)

@flow
def naive() -> None:
    for i in range(COUNT):
        send_one(i)

if __name__ == "__main__":
    start = time.perf_counter()
    naive()
    print(COUNT / (time.perf_counter() - start))
"""


def naive(port: int, count: int, size: int, api_url: str) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
        script.write(NAIVE.format(port=port, count=count, size=size))
    try:
        out = subprocess.run([sys.executable, script.name], capture_output=True, text=True, check=True,
                             env={**os.environ, "PREFECT_API_URL": api_url})
    finally:
        os.unlink(script.name)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--customers", type=int, default=100_000, help="the largest store size")
    parser.add_argument("--naive", type=int, default=300, help="recipients for the naive baseline")
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="sending processes, the run's own included (LIFECYCLE_WORKERS)")
    parser.add_argument("--rtt", type=float, default=0.0,
                        help="also run end to end with this round trip (ms) to the sink, through a latency proxy")
    parser.add_argument("--rtt-connections", type=int, default=32,
                        help="SMTP sessions in all for the --rtt run (split over the sending processes)")
    parser.add_argument("--dkim", action="store_true",
                        help="also run each end-to-end measurement DKIM-signed (RSA-2048), right after it")
    args = parser.parse_args()
    from models.db import create_schema, make_engine

    sizes = [s for s in SIZES if s < args.customers] + [args.customers]
    databases = args.databases.split(",")
    results: dict = {"cores": os.cpu_count(), "customers": args.customers, "workers": args.workers,
                     "connections_per_worker": CONNECTIONS, "sizes": sizes, "seed_seconds": {}, "rows": {},
                     "audience_seconds": {d: {} for d in databases},
                     "audience_query_seconds": {d: {} for d in databases}, "e2e": {}, "peak_rss_mb": {},
                     "peak_pss_mb": {}, "peak_process_rss_mb": {}}
    with tempfile.TemporaryDirectory() as folder, smtp_sink() as port, prefect_server(Path(folder)) as api_url:
        urls = {d: f"sqlite:///{folder}/bench.db" if d == "sqlite" else POSTGRES_URL for d in databases}
        if "postgresql" in urls:
            reset_postgres()
        from bench.store import grow

        engines = {d: make_engine(url) for d, url in urls.items()}
        for engine in engines.values():
            create_schema(engine)
        loaded, totals = 0, {}
        for size in sizes:
            for database, engine in engines.items():
                print(f"Growing the {database} store to {size:,} customers …", flush=True)
                start = time.perf_counter()
                rows = grow(engine, loaded + 1, size, NOW)
                seconds = round(time.perf_counter() - start, 1)
                results["seed_seconds"].setdefault(database, {})[str(size)] = seconds
                if database == databases[0]:  # the same rows go into every database
                    totals = {t: totals.get(t, 0) + n for t, n in rows.items()}
                    results["rows"][str(size)] = totals
                print(f"  {seconds} s ({', '.join(f'{n:,} {t}' for t, n in rows.items())})", flush=True)
                streamed, queried = audience_seconds(urls[database])
                results["audience_seconds"][database][str(size)] = streamed
                results["audience_query_seconds"][database][str(size)] = queried
            loaded = size
            database = databases[0]
            print(f"End to end on {database}, {size:,} customers …", flush=True)
            e2e = end_to_end(urls[database], port, api_url, args.workers)
            clear_ledger(urls[database])
            results["e2e"][f"{database}/{size}"] = {k: round(v, 1) if isinstance(v, float) else v
                                                    for k, v in e2e.items()}
            results["peak_rss_mb"][str(size)] = round(e2e["peak_rss_mb"], 1)
            results["peak_pss_mb"][str(size)] = round(e2e["peak_pss_mb"], 1)
            results["peak_process_rss_mb"][str(size)] = round(e2e["peak_process_rss_mb"], 1)
            print(f"  {e2e['sent']:,} mails in {e2e['seconds']:.1f} s: {e2e['msgs_per_s']:,.0f}/s, "
                  f"peak {e2e['peak_rss_mb']:.0f} MB RSS / {e2e['peak_pss_mb']:.0f} MB PSS", flush=True)
            if args.dkim:
                signed_run(results, f"{database}/{size}", urls[database], port, api_url, args.workers, e2e)
        for database in databases[1:]:  # the production store too, at the largest size
            print(f"End to end on {database}, {sizes[-1]:,} customers …", flush=True)
            e2e = end_to_end(urls[database], port, api_url, args.workers)
            clear_ledger(urls[database])
            results["e2e"][f"{database}/{sizes[-1]}"] = {k: round(v, 1) if isinstance(v, float) else v
                                                         for k, v in e2e.items()}
        for engine in engines.values():
            engine.dispose()
        if args.rtt:
            results["rtt"] = across_the_network(urls[databases[0]], port, api_url, args.workers, args.rtt,
                                                args.rtt_connections)
        if args.dkim:
            results["dkim_signing"] = signing_cost(dkim_settings()["LIFECYCLE_DKIM_PRIVATE_KEY"])
        size = message_size()
        sessions = args.workers * CONNECTIONS
        results["message_bytes"] = size
        results["ceiling_msgs_per_s"] = round(ceiling(port, 20_000, size, 1), 1)
        results["ceiling_parallel_sessions"] = sessions
        results["ceiling_parallel_msgs_per_s"] = round(ceiling(port, 50_000, size, sessions), 1)
        results["naive_msgs_per_s"] = round(naive(port, args.naive, size, api_url), 1)
    headline = results["e2e"][f"{databases[0]}/{sizes[-1]}"]
    if {"sqlite", "postgresql"} <= set(databases):
        results["postgresql_vs_sqlite"] = round(results["e2e"][f"postgresql/{sizes[-1]}"]["msgs_per_s"]
                                                / results["e2e"][f"sqlite/{sizes[-1]}"]["msgs_per_s"], 3)
    results["e2e_msgs_per_s"] = headline["msgs_per_s"]
    results["e2e_sent"] = headline["sent"]
    results["e2e_vs_ceiling"] = round(results["e2e_msgs_per_s"] / results["ceiling_msgs_per_s"], 3)
    results["e2e_vs_parallel_ceiling"] = round(results["e2e_msgs_per_s"] / results["ceiling_parallel_msgs_per_s"], 3)
    results["e2e_vs_naive"] = round(results["e2e_msgs_per_s"] / results["naive_msgs_per_s"], 1)
    (ROOT / "bench" / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)


def across_the_network(url: str, port: int, api_url: str, workers: int, rtt_ms: float, connections: int) -> dict:
    """The same run with the sink ``rtt_ms`` away (a latency proxy: half of it each way), over
    ``connections`` SMTP sessions in all; the round trips counted on the wire, against the
    model's limit: connections / (round trips a mail × round trip)."""
    from tests.support.latency_proxy import LatencyProxy

    per_sender = max(1, connections // workers)
    print(f"End to end {rtt_ms:g} ms from the sink, {per_sender * workers} sessions …", flush=True)
    with LatencyProxy(port, delay=rtt_ms / 2000) as link:
        e2e = end_to_end(url, link.port, api_url, workers, connections=per_sender)
        trips = link.round_trips
    clear_ledger(url)
    per_mail = trips / e2e["sent"]
    model = per_sender * workers / (per_mail * rtt_ms / 1000)
    print(f"  {e2e['sent']:,} mails in {e2e['seconds']:.1f} s: {e2e['msgs_per_s']:,.0f}/s, {per_mail:.2f} round trips "
          f"a mail, {e2e['msgs_per_s'] / model:.1%} of the model's {model:,.0f}/s", flush=True)
    return {"rtt_ms": rtt_ms, "connections": per_sender * workers, "sent": e2e["sent"],
            "seconds": round(e2e["seconds"], 1), "msgs_per_s": round(e2e["msgs_per_s"], 1),
            "round_trips": trips, "round_trips_per_mail": round(per_mail, 3), "model_msgs_per_s": round(model, 1),
            "vs_model": round(e2e["msgs_per_s"] / model, 3)}


def signed_run(results: dict, key: str, url: str, port: int, api_url: str, workers: int, unsigned: dict) -> None:
    """The same run DKIM-signed, over the same store, right after the unsigned one."""
    print(f"  DKIM-signed (RSA-2048), {key} …", flush=True)
    signed = end_to_end(url, port, api_url, workers, dkim_settings())
    clear_ledger(url)
    ratio = signed["msgs_per_s"] / unsigned["msgs_per_s"]
    results.setdefault("e2e_signed", {})[key] = {k: round(v, 1) if isinstance(v, float) else v
                                                 for k, v in signed.items()}
    results.setdefault("signed_vs_unsigned", {})[key] = round(ratio, 3)
    print(f"  {signed['sent']:,} signed mails in {signed['seconds']:.1f} s: {signed['msgs_per_s']:,.0f}/s, "
          f"{ratio:.1%} of unsigned", flush=True)


def print_table(results: dict) -> None:
    def row(label: str, value: str) -> None:
        print(f"{label:<52} {value:>14}")

    print()
    row("measure", "value")
    row("cores / sending processes (the run's own included)", f"{results['cores']} / {results['workers']}")
    for key, e2e in results["e2e"].items():
        row(f"end to end, {key} (msgs/s)", f"{e2e['msgs_per_s']:,.0f}")
        row("  mails sent / seconds", f"{e2e['sent']:,} / {e2e['seconds']:.1f}")
        if "postgres_cpu_share" in e2e:
            row(f"  PostgreSQL's own CPU, share of {results['cores']} cores", f"{e2e['postgres_cpu_share']:.1%}")
            row("  updates of sends rows that were HOT", f"{e2e['sends_hot_update_share']:.1%}")
    if "postgresql_vs_sqlite" in results:
        row("end to end, PostgreSQL / SQLite, same run", f"{results['postgresql_vs_sqlite']:.1%}")
    for key, e2e in results.get("e2e_signed", {}).items():
        row(f"end to end DKIM-signed, {key} (msgs/s)", f"{e2e['msgs_per_s']:,.0f}")
        row("  signed / unsigned, same store, same run", f"{results['signed_vs_unsigned'][key]:.1%}")
    if "rtt" in results:
        rtt = results["rtt"]
        label = f"end to end, {rtt['rtt_ms']:g} ms RTT, {rtt['connections']} sessions (msgs/s)"
        row(label, f"{rtt['msgs_per_s']:,.0f}")
        row("  SMTP round trips a mail, counted on the wire", f"{rtt['round_trips_per_mail']:.2f}")
        row("  of the model's connections / (round trips × RTT)", f"{rtt['vs_model']:.1%}")
    if "dkim_signing" in results:
        cost = results["dkim_signing"]
        row("one RSA-2048 DKIM signature, Lifecycle (µs)", f"{cost['lifecycle_sign_us']:,.0f}")
        row("  openssl speed rsa2048, one sign (µs)", f"{cost['openssl_sign_us']:,.0f}")
    parallel = results["ceiling_parallel_sessions"]
    row("smtp-source ceiling, its default 1 session (msgs/s)", f"{results['ceiling_msgs_per_s']:,.0f}")
    row(f"smtp-source, {parallel} parallel sessions (msgs/s)", f"{results['ceiling_parallel_msgs_per_s']:,.0f}")
    row("naive baseline (msgs/s)", f"{results['naive_msgs_per_s']:,.1f}")
    row("end to end / ceiling", f"{results['e2e_vs_ceiling']:.1%}")
    row(f"end to end / smtp-source, {parallel} parallel sessions", f"{results['e2e_vs_parallel_ceiling']:.1%}")
    row("end to end / naive", f"{results['e2e_vs_naive']:.1f}x")
    for size in results["sizes"]:
        row(f"peak memory at {size:,} customers (MB RSS / PSS)",
            f"{results['peak_rss_mb'][str(size)]:.0f} / {results['peak_pss_mb'][str(size)]:.0f}")
        row("  largest single process (MB RSS)", f"{results['peak_process_rss_mb'][str(size)]:.0f}")
    for database, by_size in results["audience_seconds"].items():
        for size, timings in by_size.items():
            slowest = max(timings, key=timings.get)
            query = results["audience_query_seconds"][database][size][slowest]
            row(f"audience, {database}, {int(size):,}: slowest ({slowest}) s", f"{timings[slowest]:.2f}")
            row("  of which its SQL, every row fetched (s)", f"{query:.2f}")
    for database, by_size in results["seed_seconds"].items():
        row(f"store growth on {database} (s, cumulative sizes)", " / ".join(str(s) for s in by_size.values()))
    print("\nwrote bench/results.json")


if __name__ == "__main__":
    main()
