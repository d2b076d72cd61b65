"""A three-step journey at scale: each step's audience, and its sending against a single mail's.

The store is bench/store.py's (1,000,000 customers by default, with their orders, events,
carts and history), plus a win-back series in flight: ``--in-flight`` customers (300,000)
entered it between 3 and 12 days ago, and of them the ones who entered 7 days ago or more
had its second mail 4 days or more after their first. The series: ``first`` at the entry
(kind inactivity, 90 days quiet), ``second`` 3 days later, ``third`` 4 days after that,
only for those who did not click ``first``; it ends on an order.

1. Each step's audience as a run streams it (read and classified: conditions, exits,
   consent, suppressions, re-entry, the sending policy), and its SQL alone, on SQLite and
   PostgreSQL; then as a run with ``shards: N`` reads it, in ``--shards`` slices at once (one
   per core by default), timed from the start of the slices' processes to the last row.
   Beside them, the series' entry as a single mail of the same kind: the first step's
   audience is that one, with its columns added.
2. Sending: the series' second step (``--mails`` due) against a single-mail trigger with
   as many due, alternately (A B B A, twice: ``--rounds``), in one process each as a run
   does it (Prefect-free ``flows.run.execute``, its sender processes, Postfix's smtp-sink
   on loopback), the ledger reset between runs. Prints mails/s of each and their ratio.

    python bench/journey.py [--customers 1000000] [--in-flight 300000] [--databases sqlite,postgresql]
                            [--keep DIR] [--mails 20000] [--rounds 2] [--shards 2]

``--keep DIR`` keeps the SQLite store there (and the PostgreSQL one in its database), so a
second run skips the 3–4 minute build.
"""

import argparse
import os
import shutil
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from bench.run import smtp_sink

NOW = datetime(2026, 3, 16, 12, 0, tzinfo=UTC)
POSTGRES_URL = os.environ.get("LIFECYCLE_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/bench_journey")
SERIES = "bench-series"
SINGLE = "bench-single"
ENTRY = "bench-entry"

SERIES_FILE = f"""\
name: {SERIES}
description: A three-step win-back series.
kind: inactivity
inactive_for: 60d
give_up_after: 180d
schedule: {{cron: "0 10 * * *", timezone: Europe/Berlin}}
reentry: once
steps:
  - name: first
    wait: 0s
    email: {{template: winback, subject: {{de: "Wir vermissen dich", en: "We miss you"}}}}
  - name: second
    wait: 3d
    email: {{template: winback, subject: {{de: "Noch einmal: wir vermissen dich", en: "Still missing you"}}}}
  - name: third
    wait: 4d
    when: {{not_clicked: first}}
    email: {{template: winback, subject: {{de: "Ein letztes Mal", en: "One last time"}}}}
exit_when:
  - ordered: true
"""


def single_file(mails: int, customers: int) -> str:
    """A single mail whose audience is about ``mails`` customers: a window of quiet days
    (the store's customers were last seen evenly over 200 days; 90 % consented)."""
    days = max(1, round(mails / 0.9 / customers * 200))
    return f"""\
name: {SINGLE}
description: One win-back mail.
kind: inactivity
inactive_for: 120d
give_up_after: {120 + days}d
schedule: {{cron: "0 10 * * *", timezone: Europe/Berlin}}
reentry: once
email: {{template: winback, subject: {{de: "Wir vermissen dich", en: "We miss you"}}}}
"""


def project(folder: Path, mails: int, customers: int) -> Path:
    triggers = folder / "triggers"
    triggers.mkdir(parents=True, exist_ok=True)
    for name in ("stages.yaml", "policy.yaml"):
        shutil.copy(ROOT / "triggers" / name, triggers / name)
    (triggers / "series.yaml").write_text(SERIES_FILE, encoding="utf-8")
    (triggers / "single.yaml").write_text(single_file(mails, customers), encoding="utf-8")
    entry = SERIES_FILE[:SERIES_FILE.index("steps:")].replace(f"name: {SERIES}", f"name: {ENTRY}")
    (triggers / "entry.yaml").write_text(entry + "email: {template: winback, subject: Hallo}\n", encoding="utf-8")
    return triggers


def in_flight(count: int, customers: int, mails: int) -> list[tuple]:
    """The series' rows: ``first`` for ``count`` customers spread over the store, entered 3–12
    days ago; ``second`` 3 days after it for all but ``mails`` of them, who entered 3–9 days
    ago and are due for it now. Those whose ``second`` is 4 days old or more are due for
    ``third``."""
    rows = []
    stride = max(1, customers // count)
    stamp = "%Y-%m-%d %H:%M:%S.%f"
    for n in range(count):
        i = 1 + n * stride
        # Those due for the second step entered 3 to 9 days ago: within its step_expires_after (7 d).
        days = 3 + (n % 7 if n < mails else n % 10)
        entered = (NOW - timedelta(days=days, hours=n % 7)).replace(tzinfo=None)
        key, occurrence, address = f"{SERIES}/{i}/quiet-since:bench", "quiet-since:bench", f"kunde{i}@example.de"
        steps = [("first", key, occurrence, entered)]
        if n >= mails:
            steps.append(("second", f"{key}/second", f"{occurrence}/second", entered + timedelta(days=3)))
        for step, send_key, occ, at in steps:
            when = at.strftime(stamp)
            rows.append((send_key, SERIES, i, occ, "marketing", "sent", "bench", "at_risk", "winback/default.html.j2",
                         address, "", when, when, when, "250 ok", "", step))
    return rows


COLUMNS = ("send_key", "trigger", "customer_id", "occurrence", "category", "status", "run_id", "stage", "template",
           "email", "message_id", "evaluated_at", "claimed_at", "finished_at", "smtp_reply", "error", "step")


def load_in_flight(url: str, count: int, customers: int, mails: int) -> dict[str, int]:
    from sqlalchemy import text

    from bench.store import _load
    from models.db import make_engine

    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM sends WHERE trigger IN (:a, :b)"), {"a": SERIES, "b": SINGLE})
    rows = in_flight(count, customers, mails)
    _load(engine, "sends", COLUMNS, iter(rows))
    with engine.begin() as connection:
        connection.exec_driver_sql("ANALYZE")
    engine.dispose()
    return {"first": sum(r[-1] == "first" for r in rows), "second": sum(r[-1] == "second" for r in rows)}


def audiences(settings: "object", url: str) -> list[tuple[str, float, float, int]]:
    """(step, streamed s, SQL s, candidates) for each step of the series."""
    from flows.audience.query import audience_query, plain_plans, stream_candidates
    from flows.run_context import prepare
    from models.db import get_engine

    engine = get_engine(url)
    context = prepare(SERIES, NOW, settings=settings)  # type: ignore[arg-type]
    out = []
    for part in context.passes():
        assert part.step is not None
        start = time.perf_counter()
        with engine.connect() as connection:
            plain_plans(connection)  # as a run reads it
            for _ in connection.execute(audience_query(part.trigger, part.kind, part.stages, NOW, step=part.step)):
                pass
        queried = time.perf_counter() - start
        start, candidates = time.perf_counter(), 0
        for batch in stream_candidates(engine, part.trigger, part.kind, part.stages, NOW, 5000, "en", part.policy,
                                       step=part.step):
            candidates += len(batch)
        out.append((part.step.name, time.perf_counter() - start, queried, candidates))
    return out


def stream_slice(context: "object", *, audience: bool = True, should_stop: "object" = None) -> tuple[float, int]:
    """A shard process's job here: stream and classify its slice of the pass's audience, as
    the run's slice would, and say how long it took and how many rows it classified."""
    from flows.audience.query import stream_candidates
    from flows.run_context import RunContext

    assert isinstance(context, RunContext)
    start, candidates = time.perf_counter(), 0
    for batch in stream_candidates(context.engine, context.trigger, context.kind, context.stages, NOW, 5000, "en",
                                   context.policy, step=context.step, shard=context.shard):
        candidates += len(batch)
    return time.perf_counter() - start, candidates


def sliced_audiences(settings: "object", url: str, shards: int) -> list[tuple[str, float, float, int]]:
    """(step, seconds from the start of the slices' processes to the last row of the slowest
    one, that slowest slice's own streaming, candidates) for each step, read in ``shards``
    slices at once by the run's machinery (``flows.shards.run_slices``)."""
    from dataclasses import replace

    from flows.run import slices
    from flows.run_context import prepare
    from flows.shards import run_slices

    context = prepare(SERIES, NOW, settings=settings)  # type: ignore[arg-type]
    out = []
    for part in context.passes():
        assert part.step is not None
        whole = replace(part, shards=shards)
        start = time.perf_counter()
        parts = run_slices(shards, lambda: slices(whole), here=stream_slice,  # noqa: B023 - called right here
                           should_stop=lambda: False, job="bench.journey:stream_slice")
        out.append((part.step.name, time.perf_counter() - start, max(seconds for seconds, _ in parts),
                    sum(n for _, n in parts)))
    return out


def entry_alone(settings: "object", url: str) -> list[tuple[str, float, float, int]]:
    """The series' entry as a single mail of the same kind over the same store: the first
    step's audience is this one, with its conditions and the entries' re-entry as columns."""
    from flows.audience.query import audience_query, plain_plans, stream_candidates
    from flows.run_context import prepare
    from models.db import get_engine

    engine = get_engine(url)
    context = prepare(ENTRY, NOW, settings=settings)  # type: ignore[arg-type]
    start = time.perf_counter()
    with engine.connect() as connection:
        plain_plans(connection)
        for _ in connection.execute(audience_query(context.trigger, context.kind, context.stages, NOW)):
            pass
    queried = time.perf_counter() - start
    start, candidates = time.perf_counter(), 0
    for batch in stream_candidates(engine, context.trigger, context.kind, context.stages, NOW, 5000, "en",
                                   context.policy):
        candidates += len(batch)
    return [("(single)", time.perf_counter() - start, queried, candidates)]


def send_once(settings: "object", url: str, trigger: str) -> tuple[int, float, str]:
    """One run of ``trigger`` (only its second step for the series), then its rows deleted."""
    from sqlalchemy import text

    from flows.outcomes import Outcome
    from flows.run import execute
    from flows.run_context import prepare
    from models.db import make_engine

    context = prepare(trigger, NOW, settings=settings)  # type: ignore[arg-type]
    if trigger == SERIES:
        context = next(p for p in context.passes() if p.step is not None and p.step.name == "second")
    start = time.perf_counter()
    summary = execute(context)
    seconds = time.perf_counter() - start
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM sends WHERE run_id = :run"), {"run": context.run_id})
    engine.dispose()
    others = ", ".join(f"{outcome} {n:,}" for outcome, n in sorted(summary.outcomes.items()) if outcome != Outcome.SENT)
    return summary.outcomes[Outcome.SENT], seconds, others


def machine_pace() -> float:
    """Seconds for a plain Python loop of 10,000,000 additions: this machine's speed drifts
    between runs (by a factor of three seen here), and every figure above is in seconds."""
    start, total = time.perf_counter(), 0
    for i in range(10_000_000):
        total += i
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--in-flight", type=int, default=300_000)
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--keep", type=Path, help="keep (and reuse) the SQLite store in this folder")
    parser.add_argument("--mails", type=int, default=20_000, help="due for each of the two sending runs")
    parser.add_argument("--rounds", type=int, default=2, help="A B B A rounds of the sending comparison")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--shards", type=int, default=os.cpu_count() or 1,
                        help="also read each step's audience in this many slices at once (1: not)")
    args = parser.parse_args()

    from sqlalchemy import func, select
    from sqlmodel import SQLModel

    import models
    from flows.settings import Settings
    from models.db import create_schema, make_engine

    print(f"this machine's pace: {machine_pace():.2f} s per 10,000,000 additions in a Python loop", flush=True)
    folder = args.keep or Path(os.environ.get("TMPDIR", "/tmp")) / "lifecycle-bench-journey"
    folder.mkdir(parents=True, exist_ok=True)
    triggers = project(folder, args.mails, args.customers)
    with smtp_sink() as port:
        for database in args.databases.split(","):
            url = f"sqlite:///{folder}/journey.db" if database == "sqlite" else POSTGRES_URL
            if database == "postgresql":
                from tests.conftest import ensure_database

                ensure_database(url)
            engine = make_engine(url)
            create_schema(engine)
            with engine.connect() as connection:
                have = connection.execute(select(func.count()).select_from(models.Customer)).scalar_one()
            if have != args.customers:
                print(f"{database}: building the store ({args.customers:,} customers) …", flush=True)
                SQLModel.metadata.drop_all(engine)
                with engine.begin() as connection:
                    connection.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
                create_schema(engine)
                from bench.store import grow

                start = time.perf_counter()
                grow(engine, 1, args.customers, NOW)
                print(f"  {time.perf_counter() - start:.0f} s", flush=True)
            engine.dispose()
            rows = load_in_flight(url, args.in_flight, args.customers, args.mails)
            print(f"{database}: in flight: {rows['first']:,} entered, {rows['second']:,} past the second step")
            settings = Settings(database_url=url, smtp_url=f"smtp://127.0.0.1:{port}?connections=4",
                                triggers_dir=triggers, templates_dir=ROOT / "templates", batch_size=1000,
                                in_flight=200, workers=args.workers, secret="bench-secret-0123456789abcdef",
                                environment="development")
            for step, streamed, queried, candidates in [*audiences(settings, url), *entry_alone(settings, url)]:
                print(f"  audience of {step:>6}: {streamed:5.2f} s streamed and classified, {queried:5.2f} s SQL "
                      f"alone, {candidates:,} candidates", flush=True)
            if args.shards > 1:
                for step, wall, slowest, candidates in sliced_audiences(settings, url, args.shards):
                    print(f"  audience of {step:>6} in {args.shards} slices at once: {wall:5.2f} s from the start of "
                          f"their processes to the last row ({slowest:5.2f} s the slowest slice's own streaming), "
                          f"{candidates:,} candidates", flush=True)
            rates: dict[str, list[float]] = {SINGLE: [], SERIES: []}
            for _ in range(args.rounds):
                for trigger in (SINGLE, SERIES, SERIES, SINGLE):
                    sent, seconds, others = send_once(settings, url, trigger)
                    rates[trigger].append(sent / seconds)
                    label = "series, second step" if trigger == SERIES else "single mail"
                    print(f"  {label:>20}: {sent:,} mails in {seconds:.1f} s, {sent / seconds:,.0f}/s ({others})",
                          flush=True)
            if not args.rounds:
                continue
            single, series = statistics.mean(rates[SINGLE]), statistics.mean(rates[SERIES])
            print(f"  {database}: series step / single mail: {series:,.0f} / {single:,.0f} mails/s = "
                  f"{series / single:.3f}", flush=True)


if __name__ == "__main__":
    main()
