"""Upgrading from the last release before the restructuring (15be30b): over one store, the new
code sends nothing the old code sent, leaves every ledger row the old code wrote as it was, and
makes exactly the sends the old code would have made.

The old code is the real one, unpacked from this repository's history and run in child
processes (its Prefect-free path); the new code is the installed package, run in child processes
of its own through its Prefect-free path (``flows.run.run`` over ``flows.run_context.prepare``:
the engine ``lifecycle run --all`` runs inside a Prefect flow, with the same audience query, send
keys, claims and ledger, without a Prefect server's start-up per test). One process per step and
side runs every enabled trigger; each process is started once and given its steps on stdin, so
its imports and its loaded project serve every step. Mail goes to real SMTP servers on loopback.

1. The old code creates the schema; the store gets someone due for every trigger, someone the
   policy defers (quiet hours, the frequency cap), an address the relay refuses (failed), and
   a run that died mid-send (one key ``claimed``, one ``sending``: in doubt).
2. The old code runs every enabled trigger at ``T0``: the ledger and the mail are snapshot.
3. The store is copied: the new code carries on over the store, the old code over the copy.
   Both run every trigger at ``T0`` again, then at ``T1`` (20 hours later: within every
   re-entry window, past the deferrals' moments and the dead run's lease, and one customer
   reaches onboarding day 3).
4. After each step: no mail for a key the old code already sent, every row it had finished
   unchanged to the byte, and both ledgers and both mailboxes the same, key by key.
"""

import os
import queue
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, MetaData, create_engine, inspect, make_url, text, update
from sqlmodel import Session, col

from models import Customer
from models.db import make_engine
from tests.support import ROOT
from tests.support.builders import NOW, Store, ago
from tests.support.old_release import OldRelease, Unavailable, extract, without_pythonpath
from tests.support.smtp_server import Script, SmtpServer

OLD_RELEASE = "15be30b"  # the last release with the flat flows/ package
T0 = NOW  # Monday 2026-03-16 12:00 UTC (13:00 in Berlin)
T1 = T0 + timedelta(hours=20)  # Tuesday 08:00 UTC: past quiet hours and the 16 h cap, inside every re-entry
CRASHED_AT = T0 + timedelta(hours=2)  # a complaint-ack run that died mid-send
SECRET = "upgrade-test-secret-0123456789"
REFUSED = "550 5.1.1 User unknown"

# What names a send and what became of it: equal between the old and the new code, key by key.
IDENTITY = ("send_key", "trigger", "customer_id", "occurrence", "category", "ref_id", "status", "stage", "template",
            "email", "message_id", "not_before", "expires_at", "error")
# Columns of sends added by migrations since the old release, as they are on the rows it wrote:
# no tracked links, no journey step, experiment or entry moment.
ADDED_SINCE = {"links": None, "step": "", "variant": "", "experiment": "", "entered_at": None}
FINISHED = ("sent", "failed", "sending")  # states no later run may touch (``sending``: in doubt, ops decide)

# Every child answers each line of steps on its stdin with lines on its stdout, the last one DONE.
DONE = "-- steps done --"

# The old release, without Prefect. ``schema`` (as an argument: before the pipeline, and
# Prefect, is imported, so the store can be seeded meanwhile) migrates a new store. Then, a
# line of steps at a time: ``run@MOMENT`` runs every enabled trigger at MOMENT;
# ``crash:TRIGGER@MOMENT`` is a run of TRIGGER that died after claiming its window and handing
# the first key to DATA (no reply recorded), an hour ago.
OLD_CODE = r"""
import json
import os
import sys
from datetime import datetime, timedelta

from models.db import create_schema, get_engine

DONE = sys.argv[1]
if sys.argv[2:] == ["schema"]:
    create_schema(get_engine(os.environ["LIFECYCLE_DATABASE_URL"]))
    print(DONE, flush=True)

from sqlalchemy import update

from flows import ledger
from flows.pipeline import execute, load, prepare_job
from flows.settings import Settings
from models import Send, SendStatus
from models.types import utcnow

settings = Settings()
engine = get_engine(settings.database_url)  # connects at its first step
project = None  # loaded (every template test-rendered, on a time budget) at the first run, not beside others


class Crash(Exception):
    pass


def dies_mid_send(job, prepared, batch=0):
    won = ledger.claim(engine, [p.claim for p in prepared], job.run_id, job.now, settings.claim_lease)
    ledger.mark_sending(engine, sorted(won)[:1], job.run_id)
    raise Crash(sorted(won))


for line in sys.stdin:
    for step in line.split():
        action, _, moment = step.partition("@")
        if action == "run":
            project = project or load(settings)
            assert not project.problems, project.problems
            for name, trigger in project.triggers.items():
                if trigger.enabled:
                    summary = execute(prepare_job(name, datetime.fromisoformat(moment), settings=settings,
                                                  project=project))
                    print(json.dumps({"trigger": name, "now": moment, "outcomes": dict(summary.outcomes)}))
        elif action.startswith("crash:"):
            try:
                execute(prepare_job(action.removeprefix("crash:"), datetime.fromisoformat(moment),
                                    settings=settings), dispatch=dies_mid_send)
            except Crash as crash:
                print(json.dumps({"crashed": crash.args[0]}))
            else:
                sys.exit("nothing was due for the crashed run")
            with engine.begin() as connection:  # the run died an hour ago: its lease has run out
                connection.execute(update(Send).where(Send.status.in_([SendStatus.CLAIMED, SendStatus.SENDING]))
                                   .values(claimed_at=utcnow() - timedelta(hours=1)))
        else:
            sys.exit(f"unknown step {step!r}")
    print(DONE, flush=True)
"""

# The new code (the installed package), without Prefect, a MOMENT a line: every enabled trigger,
# each run as ``lifecycle run --all`` has its flow run it (``prepare`` over the project loaded
# once, then ``run``: the relay checked, every batch sent). It must not be the old release's tree.
NEW_CODE = r"""
import json
import sys
from datetime import datetime
from pathlib import Path

import flows
from flows.run import run
from flows.run_context import load, prepare
from flows.settings import Settings
from models.db import create_schema, get_engine

DONE, old_root = sys.argv[1], Path(sys.argv[2])
assert not Path(flows.__file__).resolve().is_relative_to(old_root.resolve()), flows.__file__
settings = Settings()
engine = get_engine(settings.database_url)  # connects at its first step, once the store is copied
project = None
for line in sys.stdin:
    moment = line.strip()
    if project is None:
        create_schema(engine)  # the upgrade's migrations, as `lifecycle db upgrade` (or any command in development)
    project = project or load(settings)  # at the first step: its test renders on a time budget, not beside others
    assert not project.problems, project.problems
    for name, trigger in project.triggers.items():
        if trigger.enabled:
            summary = run(prepare(name, datetime.fromisoformat(moment), settings=settings, project=project,
                                  engine=engine))
            assert not summary.interrupted, name
            print(json.dumps({"trigger": name, "now": moment, "outcomes": dict(summary.outcomes)}))
    print(DONE, flush=True)
"""


@pytest.fixture(scope="module")
def old_release(tmp_path_factory: pytest.TempPathFactory) -> OldRelease:
    try:
        return extract(OLD_RELEASE, tmp_path_factory.mktemp("old-release"))
    except Unavailable as exc:
        pytest.skip(f"the old release is needed to test the upgrade from it: {exc}")


# -- stores --------------------------------------------------------------------------


class SqliteStores:
    migrated_copy = False  # the copy is the whole file

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def url(self, name: str) -> str:
        return f"sqlite:///{self.folder / f'{name}.db'}"

    def copy(self, source: str, target: str) -> None:
        """SQLite's online backup: the WAL's pages too."""
        with sqlite3.connect(self.folder / f"{source}.db") as src, sqlite3.connect(self.folder / f"{target}.db") as dst:
            src.backup(dst)
        dst.close()
        src.close()

    def close(self) -> None:
        pass


class PostgresStores:
    """Schemas of their own in the suite's database (``upgrade_<name>``, which the URL's
    ``search_path`` makes the store's), dropped afterwards. Not databases of their own: on a
    busy server every DROP DATABASE waits for a checkpoint, seconds each."""

    migrated_copy = True  # the copy's tables are made by the old release's migrations, then filled

    def __init__(self, base: str) -> None:
        self.base = make_url(base)
        self.admin = create_engine(self.base.set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT")
        self.names: list[str] = []

    def _name(self, name: str) -> str:
        return f"upgrade_{name}"

    def url(self, name: str) -> str:
        url = self.base.update_query_dict({"options": f"-csearch_path={self._name(name)}"})
        return url.render_as_string(hide_password=False)

    def create(self, name: str) -> None:
        schema = self._name(name)
        with self.admin.connect() as connection:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        self.names.append(schema)

    def copy(self, source: str, target: str) -> None:
        """Every row of every table into the target's tables (made by the same migrations), every
        sequence where the source's is; then the two proven equal, table by table and row by row."""
        src, dst = self._name(source), self._name(target)
        with self.admin.connect() as connection:
            connection = connection.execution_options(isolation_level="REPEATABLE READ")
            with connection.begin():
                tables = MetaData()
                tables.reflect(connection, schema=src)
                names = [table.name for table in tables.sorted_tables]  # referenced tables first
                assert sorted(names) == sorted(inspect(connection).get_table_names(schema=dst)), (src, dst)
                for name in reversed(names):  # the target's migrations table has its row already
                    connection.execute(text(f'DELETE FROM "{dst}"."{name}"'))
                for name in names:
                    connection.execute(text(f'INSERT INTO "{dst}"."{name}" OVERRIDING SYSTEM VALUE '
                                            f'SELECT * FROM "{src}"."{name}"'))
                listed = text("SELECT sequencename FROM pg_sequences WHERE schemaname = :schema ORDER BY 1")
                sequences = {schema: connection.execute(listed, {"schema": schema}).scalars().all()
                             for schema in (src, dst)}
                assert sequences[src] == sequences[dst], sequences
                def state(schema: str, sequence: str) -> tuple[Any, ...]:
                    return tuple(connection.execute(
                        text(f'SELECT last_value, is_called FROM "{schema}"."{sequence}"')).one())

                for sequence in sequences[src]:
                    last, called = state(src, sequence)
                    connection.execute(text("SELECT setval(:sequence, :last, :called)"),
                                       {"sequence": f'"{dst}"."{sequence}"', "last": last, "called": called})
                for name in names:
                    a, b = f'"{src}"."{name}"', f'"{dst}"."{name}"'
                    parted = connection.execute(text(
                        f"SELECT count(*) FROM ((SELECT r::text FROM {a} r EXCEPT ALL SELECT r::text FROM {b} r) "
                        f"UNION ALL (SELECT r::text FROM {b} r EXCEPT ALL SELECT r::text FROM {a} r)) AS parted"
                    )).scalar()
                    assert parted == 0, f"{parted} row(s) of {name} differ between {src} and its copy"
                for sequence in sequences[src]:
                    assert state(src, sequence) == state(dst, sequence), sequence

    def close(self) -> None:
        with self.admin.connect() as connection:
            for schema in self.names:
                connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        self.admin.dispose()


# Both stores in the default run: without a Prefect server each takes some 13-15 s on an idle pair of cores.
@pytest.fixture(params=["sqlite", "postgresql"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqliteStores | PostgresStores]:
    if request.param == "sqlite":
        yield SqliteStores(tmp_path)
        return
    pg = PostgresStores(os.environ.get("LIFECYCLE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"))
    try:
        pg.create("store")
        pg.create("old")
        yield pg
    finally:
        pg.close()


# -- the two releases ------------------------------------------------------------------


@dataclass
class Side:
    """One release over one store, mailing one SMTP server."""

    url: str
    smtp: SmtpServer
    env: dict[str, str]

    def received(self, since: int = 0) -> list[tuple[str, tuple[str, ...], str]]:
        return sorted((r.message["Message-ID"], tuple(r.recipients), r.message["Subject"])
                      for r in self.smtp.received[since:])


def lifecycle_env(old: OldRelease, url: str, smtp: SmtpServer) -> dict[str, str]:
    """Settings through the environment; the store's triggers and templates are the old release's own."""
    return {"LIFECYCLE_DATABASE_URL": url, "LIFECYCLE_SMTP_URL": smtp.url, "LIFECYCLE_SECRET": SECRET,
            "LIFECYCLE_TRIGGERS_DIR": str(old.root / "triggers"),
            "LIFECYCLE_TEMPLATES_DIR": str(old.root / "templates"), "LIFECYCLE_WORKERS": "1",
            "LIFECYCLE_SMTP_BACKOFF_SECONDS": "0.01", "LIFECYCLE_SMTP_BACKOFF_MAX_SECONDS": "0.05",
            "PREFECT_LOGGING_LEVEL": "WARNING"}


class Child:
    """A process that takes lines of steps on its stdin and answers each with lines on its
    stdout, the last one DONE. Its stderr goes to a file, shown when it fails."""

    def __init__(self, label: str, command: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.label = label
        self.errors = tempfile.TemporaryFile("w+")  # noqa: SIM115 -- closed by stop()
        self.output: list[str] = []
        self.process = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.errors, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def send(self, steps: str) -> str | None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(steps + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            return self._failure("exited before it was given its steps")
        return None

    def answer(self, deadline: float) -> str | None:
        """None once the child has done its steps; else what went wrong, with its output."""
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.process.kill()
                return self._failure("timed out")
            if line is None:
                return self._failure(f"exited {self.process.wait()}")
            if line == DONE:
                return None
            self.output.append(line)

    def close(self, timeout: float = 30) -> str | None:
        """End of its steps: it exits, successfully (None) or with what went wrong."""
        assert self.process.stdin is not None
        try:
            self.process.stdin.close()
            returncode = self.process.wait(timeout)
        except BrokenPipeError:
            returncode = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self._failure("did not exit")
        return None if returncode == 0 else self._failure(f"exited {returncode}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.errors.close()

    def _failure(self, what: str) -> str:
        self.errors.seek(0)
        out = "\n".join(self.output)
        return f"{self.label}: {what}\n--- stdout\n{out[-4000:]}\n--- stderr\n{self.errors.read()[-4000:]}"


def old_code(old: OldRelease, label: str, side: Side, *first: str) -> Child:
    """The old release over ``side``'s store; ``first``: steps it takes as it starts (``schema``)."""
    return Child(label, old.command(OLD_CODE, DONE, *first), old.root, old.env(**side.env))


def new_code(old: OldRelease, label: str, side: Side) -> Child:
    """The installed package: no PYTHONPATH, and the checkout's root as its folder (the one
    ``flows`` the venv has installed)."""
    return Child(label, [sys.executable, "-c", NEW_CODE, DONE, str(old.root)], ROOT, without_pythonpath(**side.env))


def steps(*given: tuple[Child, str], timeout: float = 120) -> None:
    """Give every child its steps (they work side by side) and wait for them all; any failure
    fails the test with the child's output."""
    problems = [problem for child, line in given if (problem := child.send(line))]
    deadline = time.monotonic() + timeout
    problems += [problem for child, _ in given if (problem := child.answer(deadline))]
    assert not problems, "\n\n".join(problems)


def started(*children: Child, timeout: float = 120) -> None:
    """Wait for the steps the children take as they start."""
    deadline = time.monotonic() + timeout
    problems = [problem for child in children if (problem := child.answer(deadline))]
    assert not problems, "\n\n".join(problems)


def closed(*children: Child) -> None:
    problems = [problem for child in children if (problem := child.close())]
    assert not problems, "\n\n".join(problems)


# -- the ledger ------------------------------------------------------------------------


def ledger(url: str) -> dict[str, dict[str, Any]]:
    """Every row of ``sends`` as the database has it (no model in between), by send key."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT * FROM sends")).mappings().all()
    finally:
        engine.dispose()
    return {row["send_key"]: dict(row) for row in rows}


def identity(rows: dict[str, dict[str, Any]]) -> dict[str, tuple[Any, ...]]:
    return {key: tuple(row[c] for c in IDENTITY) for key, row in rows.items()}


def differences(left: dict[str, tuple[Any, ...]], right: dict[str, tuple[Any, ...]]) -> list[str]:
    """Readable key-by-key differences of two identity maps (empty when equal)."""
    out = []
    for key in sorted(set(left) | set(right)):
        a, b = left.get(key), right.get(key)
        if a != b:
            out.append(f"{key}:\n   old code: {dict(zip(IDENTITY, a, strict=True)) if a else None}\n"
                       f"   new code: {dict(zip(IDENTITY, b, strict=True)) if b else None}")
    return out


# -- the store -------------------------------------------------------------------------


class OldSchemaStore(Store):
    """The builders over the old release's tables: each row is written with the columns that
    store has (a column added since, such as ``customers.untracked_at``, is left out, as the
    old release would)."""

    def _add(self, *rows: object) -> None:
        columns = {name: {c["name"] for c in inspect(self.engine).get_columns(name)}
                   for name in {row.__table__.name for row in rows}}  # type: ignore[attr-defined]
        with self.engine.begin() as connection:
            for row in rows:
                table = row.__table__  # type: ignore[attr-defined]
                values = {c.name: getattr(row, c.name) for c in table.c
                          if c.name in columns[table.name] and getattr(row, c.name) is not None}
                result = connection.execute(table.insert().values(values))
                if "id" in table.c and getattr(row, "id", None) is None:
                    row.id = result.inserted_primary_key[0]  # type: ignore[attr-defined]


def seed(engine: Engine, smtp: SmtpServer) -> dict[str, Customer]:
    """Someone due for every trigger at T0, a few held back or refused, and what comes due by T1."""
    store = OldSchemaStore(engine)
    people: dict[str, Customer] = {}
    # abandoned-cart: two carts, and one whose owner's night it is (quiet hours until 08:00 local)
    people["cart_de"] = store.customer("Jürgen", last_name="Groß", locale="de-DE")
    store.cart(people["cart_de"], ago(hours=3), items=[("Wanderschuh „Alpin“", 129.9, 1), ("Socken", 12.5, 2)])
    people["cart_en"] = store.customer("Amelia", last_name="Smith", locale="en-GB")
    store.cart(people["cart_en"], ago(hours=5))
    people["cart_night"] = store.customer("Katja", locale="de-DE")  # Kamchatka: 00:00 at T0, 20:00 at T1
    store.cart(people["cart_night"], ago(hours=4))
    # onboarding-day-0, and a sign-up with a cart: the cart reminder goes first, the welcome waits for the cap
    people["welcome"] = store.customer("Nele", created=ago(hours=3), last_seen=ago(hours=3))
    people["capped"] = store.customer("Paul", created=ago(hours=3), last_seen=ago(hours=3))
    store.cart(people["capped"], ago(hours=3))
    # onboarding-day-3: one at T0, and one who reaches day 3 only by T1
    people["day3"] = store.customer("Dora", created=ago(days=3, hours=3), last_seen=ago(days=2))
    people["day3_later"] = store.customer("Emil", created=ago(days=2, hours=10), last_seen=ago(days=2))
    # complaint-ack: one acknowledged, one refused by the relay (failed, then suppressed)
    people["complaint"] = store.customer("Greta")
    store.complaint(people["complaint"], ago(hours=1), subject="Päckchen kaputt")
    people["refused"] = store.customer("Bernd")
    store.complaint(people["refused"], ago(hours=2))
    smtp.handler.scripts[str(people["refused"].email)] = Script(rcpt=[REFUSED])
    # complaint-ack after T0: the run that dies mid-send (one claimed, one in doubt)
    for label, name in (("crash_a", "Clara"), ("crash_b", "Doris")):
        people[label] = store.customer(name)
        store.complaint(people[label], T0 + timedelta(hours=1), subject="Falsche Größe")
    # confirm-subscription: an opt-in awaiting its double opt-in
    people["opt_in"] = store.customer("Olaf", consent=False)
    # we-miss-you: away for 70 days, last ordered 80 days ago
    people["inactive"] = store.customer("Ines", last_seen=ago(days=70))
    store.order(people["inactive"], ago(days=80))
    # winback-lapsed: two lapsed, one of them in the middle of the night
    people["lapsed"] = store.customer("Lea")
    store.order(people["lapsed"], ago(days=500))
    people["lapsed_night"] = store.customer("Tom")
    store.order(people["lapsed_night"], ago(days=500))
    with Session(engine) as session:
        for label in ("cart_night", "lapsed_night"):
            session.execute(update(Customer).where(col(Customer.id) == people[label].id)
                            .values(timezone="Asia/Kamchatka"))
        session.execute(update(Customer).where(col(Customer.id) == people["opt_in"].id)
                        .values(consent_requested_at=ago(minutes=30)))
        session.commit()
    return people


# -- the test --------------------------------------------------------------------------


def test_the_new_code_over_an_old_store_sends_nothing_twice_and_keeps_every_key(
        old_release: OldRelease, stores: SqliteStores | PostgresStores) -> None:
    with ExitStack() as stack:
        smtp: dict[str, SmtpServer] = {}
        for name in ("before", "new", "old"):
            smtp[name] = SmtpServer().start()
            stack.callback(smtp[name].stop)
        url, old_url = stores.url("store"), stores.url("old")
        before = Side(url, smtp["before"], lifecycle_env(old_release, url, smtp["before"]))
        new = Side(url, smtp["new"], lifecycle_env(old_release, url, smtp["new"]))
        old = Side(old_url, smtp["old"], lifecycle_env(old_release, old_url, smtp["old"]))

        def child(made: Child) -> Child:
            stack.callback(made.stop)
            return made

        # 1. A store of the old release, with someone due for every trigger.
        first = child(old_code(old_release, "old release over the store", before, "schema"))
        started(first)
        # The two processes of the upgrade start now, and import their code while the store is
        # seeded and the old release works; neither connects to its store before its first step.
        after = child(new_code(old_release, "new code over the store", new))
        beside = child(old_code(old_release, "old release over the copy", old,
                                *(["schema"] if stores.migrated_copy else [])))
        engine = make_engine(url)
        people = seed(engine, smtp["before"])
        engine.dispose()

        # 2. The old release at work: every trigger at T0, then a run that dies mid-send.
        steps((first, f"run@{T0.isoformat()} crash:complaint-ack@{CRASHED_AT.isoformat()}"))
        closed(first)  # the store is quiet while it is copied
        snapshot = ledger(url)
        mailed = before.received()
        statuses = {row["status"] for row in snapshot.values()}
        assert {"sent", "failed", "deferred", "claimed", "sending"} <= statuses, statuses
        assert {row["trigger"] for row in snapshot.values() if row["status"] == "sent"} == {
            "abandoned-cart", "complaint-ack", "confirm-subscription", "we-miss-you", "onboarding-day-0",
            "onboarding-day-3", "winback-lapsed"}, "every trigger has sent something before the upgrade"
        deferred = {row["customer_id"] for row in snapshot.values() if row["status"] == "deferred"}
        assert {people[p].id for p in ("cart_night", "lapsed_night", "capped")} <= deferred
        assert [row["email"] for row in snapshot.values() if row["status"] == "failed"] == [people["refused"].email]
        sent_ids = {row["message_id"] for row in snapshot.values() if row["status"] == "sent"}
        assert sorted(m[0] for m in mailed) == sorted(sent_ids), "one mail per sent row, and no more"
        finished = {key: row for key, row in snapshot.items() if row["status"] in FINISHED}
        old_ids = {row["message_id"] for row in finished.values()}  # handed to the relay by the old code

        # 3. The upgrade: the new code carries on over the store, the old code over a copy of it.
        if stores.migrated_copy:
            started(beside)  # its tables made: now they can be filled
        stores.copy("store", "old")

        previous = snapshot
        for moment in (T0, T1):
            new_seen, old_seen = len(new.smtp.received), len(old.smtp.received)
            at = moment.isoformat()
            steps((after, at), (beside, f"run@{at}"))
            after_new, after_old = ledger(new.url), ledger(old.url)
            received_new, received_old = new.received(new_seen), old.received(old_seen)

            # Nothing the old code sent (or handed to the relay) is mailed again: by Message-ID,
            # and by the send key of the row that mail was recorded under.
            again = sorted(m for m in received_new if m[0] in old_ids)
            assert not again, f"at {moment:%Y-%m-%d %H:%M}, mailed again after the upgrade: {again}"
            key_of = {row["message_id"]: key for key, row in after_new.items() if row["message_id"]}
            mailed_keys = [key_of.get(m[0]) for m in received_new]
            assert None not in mailed_keys, f"mail without a ledger row: {received_new}"
            assert not set(mailed_keys) & set(finished), f"keys the old code had finished, mailed again: {mailed_keys}"
            # Every row the old code finished is as it left it, every column; a column the upgrade
            # added (such as ``links`` or ``step``) is empty on it.
            changed = {key: (row, after_new.get(key)) for key, row in finished.items()
                       if after_new.get(key) != {**row, **ADDED_SINCE}}
            assert not changed, f"at {moment:%Y-%m-%d %H:%M}, rows of the old code changed: {changed}"
            # Every other key, and every new one, as the old code would have it.
            diff = differences(identity(after_old), identity(after_new))
            assert not diff, f"at {moment:%Y-%m-%d %H:%M}, the ledgers part:\n" + "\n".join(diff)
            assert received_new == received_old, f"at {moment:%Y-%m-%d %H:%M}, the mail differs"
            sent_now = {row["message_id"] for key, row in after_new.items()
                        if row["status"] == "sent" and previous.get(key, {}).get("status") != "sent"}
            assert sorted(m[0] for m in received_new) == sorted(sent_now), "one mail per newly sent row"
            if moment == T0:  # the same moment again: no one new is due, and nothing is taken over yet
                assert received_new == [] and identity(after_new) == identity(snapshot)
            previous = after_new

        # The later moment did bring work, the same on both sides: the deferrals' moments came,
        # the dead run's claim was taken over, day 3 came for one more, the in-doubt key stayed.
        now_sent = {row["customer_id"] for key, row in after_new.items()
                    if row["status"] == "sent" and snapshot.get(key, {}).get("status") != "sent"}
        assert {people[p].id for p in ("cart_night", "lapsed_night", "capped", "day3_later")} <= now_sent
        claimed = [key for key, row in snapshot.items() if row["status"] == "claimed"]
        assert claimed and all(after_new[key]["status"] == "sent" for key in claimed)
        assert [row["status"] for row in after_new.values() if row["status"] == "sending"] == ["sending"]
        closed(after, beside)
