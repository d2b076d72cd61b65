"""The ledger's write capacity on PostgreSQL: how many sends a second its writes allow, from
several writers at once, and what that means for a campaign spread over many machines.

Every mail costs the ledger two writes, each through the real claim protocol
(``flows.send.claims``): the claim, straight into ``sending`` (an insert), and the outcome
(an update), each one statement per window. Each writer is a process doing what a sender
does per window of ``--window`` mails, without rendering or SMTP: hand over, record.
Writers run 1, 2, 4 … at once over disjoint customers, for ``--seconds`` each, and the
table gives sends a second in all, and PostgreSQL's own share of the machine's CPU
meanwhile (``PostgresCpu``). Here the writers and PostgreSQL share the same cores, so the
capacity measured is a floor for a PostgreSQL on a machine of its own.

    python bench/ledger.py [--writers 1,2,4,8] [--seconds 15] [--window 200] [--customers 400000]

Then the model: with one machine sending ``--machine-rate`` mails a second (the end-to-end
figure of ``bench/run.py``) and the ledger taking at most the best rate measured here, how
many machines a 10,000,000-mail campaign can use before PostgreSQL is the limit, and how
long it takes on 1, 4 and 16 of them.
"""

import argparse
import multiprocessing
import os
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

URL = os.environ.get("LIFECYCLE_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/bench_ledger")
NOW = datetime(2026, 3, 16, 12, 0, tzinfo=UTC)
WRITES = 2  # a mail's writes to the ledger: its claim, handed over (an insert), and its outcome (an update)


def writer(url: str, first: int, count: int, window: int, seconds: float, start_at: float,
           done: "multiprocessing.Queue[int]") -> None:
    """Claim, mark and record windows of sends for customers ``first..first+count`` until
    ``seconds`` have passed; put how many sends it completed."""
    from flows.send import claims
    from models import SendStatus
    from models.db import make_engine

    engine = make_engine(url)
    with engine.connect():
        pass
    run = f"bench-{first}"
    while time.time() < start_at:
        time.sleep(0.001)
    deadline, sent, customer = time.monotonic() + seconds, 0, first
    while time.monotonic() < deadline:
        ids = [first + (customer + i) % count for i in range(window)]
        batch = [claims.Claim(f"bench-ledger/{c}/{run}/{sent}", "bench-ledger", c, f"{run}/{sent}", "lapsed", "winback",
                              f"kunde{c}@example.de", f"<{c}.{sent}@shop.example>") for c in ids]
        won = claims.hand_over(engine, batch, run, NOW)
        claims.record(engine, [claims.Decision(key, SendStatus.SENT, f"250 2.0.0 Ok: queued as {sent:012X}")
                               for key in won])
        sent += len(won)
        customer += window
    engine.dispose()
    done.put(sent)


class PostgresCpu:
    """The CPU seconds PostgreSQL spends for one database while it is entered: its backends'
    and the server's own processes' (WAL writer, checkpointer, autovacuum), from ``/proc``,
    leaving out the backends of other databases (other users of a shared server).

    Read every ``interval`` seconds, each process as last seen: a backend's CPU time leaves
    ``/proc`` with it when its client disconnects, so a single reading at the end would miss
    every connection closed before it.
    """

    def __init__(self, database: str, interval: float = 0.05) -> None:
        self.database, self.interval = database, interval
        self._start: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "PostgresCpu":
        self._start = self._read()
        self._last = dict(self._start)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    @property
    def seconds(self) -> float:
        return sum(cpu - self._start.get(pid, 0.0) for pid, cpu in self._last.items())

    def _sample(self) -> None:
        while not self._done.wait(self.interval):
            self._last.update(self._read())
        self._last.update(self._read())

    def _read(self) -> dict[int, float]:
        """CPU seconds so far of each PostgreSQL process that works for the database."""
        seen: dict[int, float] = {}
        tick = os.sysconf("SC_CLK_TCK")
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                title = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split()
            except OSError:
                continue
            if not stat[stat.index("(") + 1:stat.rindex(")")].startswith("postgres"):
                continue
            # A client backend's title: "postgres: USER DATABASE HOST(PORT) STATE".
            if len(title) > 3 and title[0] == "postgres:" and title[2] != self.database and (
                    "(" in title[3] or title[3] == "[local]"):
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            seen[int(pid)] = (int(fields[11]) + int(fields[12])) / tick
        return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--writers", default="1,2,4,8")
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--window", type=int, default=200, help="sends per claim (LIFECYCLE_IN_FLIGHT)")
    parser.add_argument("--customers", type=int, default=400_000)
    parser.add_argument("--machine-rate", type=float, default=1500, help="mails/s one machine sends end to end")
    args = parser.parse_args()

    from sqlalchemy import make_url, text
    from sqlmodel import SQLModel

    import models  # noqa: F401
    from bench.store import TABLES, Clock, _load
    from models.db import create_schema, make_engine
    from tests.conftest import ensure_database

    ensure_database(URL)
    engine = make_engine(URL)
    SQLModel.metadata.drop_all(engine)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE IF EXISTS alembic_version"))
    create_schema(engine)
    columns, rows = TABLES["customers"]
    _load(engine, "customers", columns, rows(1, args.customers, Clock(NOW)))
    with engine.begin() as connection:
        connection.exec_driver_sql("ANALYZE")
    engine.dispose()

    cores = os.cpu_count() or 1
    print(f"{'writers':>8} {'sends/s':>10} {'writes/s':>10} {'PostgreSQL CPU':>16}")
    best = 0.0
    context = multiprocessing.get_context("spawn")
    for count in map(int, args.writers.split(",")):
        done: multiprocessing.Queue[int] = context.Queue()
        share = args.customers // count
        start_at = time.time() + 3  # every writer connected and waiting
        processes = [context.Process(target=writer, args=(URL, 1 + n * share, share, args.window, args.seconds,
                                                          start_at, done)) for n in range(count)]
        for process in processes:
            process.start()
        while time.time() < start_at:
            time.sleep(0.01)
        with PostgresCpu(make_url(URL).database or "") as cpu:
            time.sleep(max(0.0, start_at + args.seconds - time.time()))
        sent = sum(done.get() for _ in processes)
        for process in processes:
            process.join()
        rate = sent / args.seconds
        best = max(best, rate)
        print(f"{count:>8} {rate:>10,.0f} {WRITES * rate:>10,.0f} {cpu.seconds / args.seconds / cores:>15.0%}",
              flush=True)
        cleanup = make_engine(URL)
        with cleanup.begin() as connection:  # each round starts from an empty ledger
            connection.execute(text("DELETE FROM sends"))
        cleanup.dispose()

    campaign = 10_000_000
    machines = best / args.machine_rate
    print(f"\nThe ledger takes at most {best:,.0f} sends/s here ({WRITES} writes each); one machine sends "
          f"{args.machine_rate:,.0f}/s: PostgreSQL is the limit beyond {machines:.1f} machines.")
    for n in (1, 4, 16):
        rate = min(n * args.machine_rate, best)
        print(f"  10,000,000 mails on {n:>2} machine(s): {rate:,.0f}/s, {campaign / rate / 60:,.0f} min"
              + (" (the ledger's limit)" if rate == best else ""))


if __name__ == "__main__":
    main()
