"""``lifecycle simulate``: a trigger's real runs over a timeline, against a scratch copy of the store.

A journey's later steps follow from the ledger rows of its earlier ones, so a dry run, which
writes nothing, can only ever show the first step. A simulation therefore copies the store
into a temporary SQLite file (``scratch_copy``) and runs the trigger there for real, once per
tick from ``start`` to ``end``, each run at ``now`` = the tick: every stage is the real one
(the audience, the conditions and exits, holdouts, variants, the policy, the templates
rendered), except the dispatch step, which sends nothing and records each mail as accepted
in the scratch copy (``accept_everything``). The next tick's steps then find those rows.
The scratch file is deleted at the end; the store itself is only read.

What each tick sees is the store as of that moment wherever the store keeps the moment:
orders by ``placed_at``, events by ``timestamp``, clicks by ``at``, sign-ups by
``created_at``, the ledger by ``evaluated_at``, stages from the orders placed by then.
What the store keeps only as it is now (whether a cart was ordered, a cart's items, a
customer's consent and last activity) is read as it is now. The trigger's own ledger rows
from ``start`` on are left out of the copy, so a past period is replayed rather than found
already sent.
"""

import logging
import sqlite3
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, delete, func, select
from sqlmodel import SQLModel, col

from flows.clock import format_duration
from flows.consent import withdrawn
from flows.message.prepare import Prepared
from flows.outcomes import Outcome
from flows.run import execute
from flows.run_context import RunContext, load, prepare
from flows.send import claims
from flows.send.batch import Counts
from flows.settings import Settings
from flows.spec.journey import StepPlan, When, plans
from flows.spec.project import Project
from models import Attribution, Engagement, ExperimentLook, Send, SendStatus
from models.db import create_schema, make_engine
from models.migrate import current, head

MAX_TICKS = 10_000  # an hourly tick for more than a year: a longer timeline wants a coarser --every
COPY_CHUNK = 5_000  # rows per read and per insert when a store that is not SQLite is copied
SIMULATED_REPLY = "250 simulated: nothing was sent"
ONE_MAIL = ""  # the step of a trigger's one mail in the ledger

# Every pass logs a line or two; a timeline of hundreds of ticks would drown the output. A
# warning (a customer whose mail does not render) still shows.
quiet = logging.getLogger("lifecycle.simulate")
quiet.setLevel(logging.WARNING)


class SimulationError(ValueError):
    """A timeline or a store that cannot be simulated; the message says why."""


def ticks(start: datetime, end: datetime, every: timedelta) -> list[datetime]:
    """``start``, ``start + every``, … up to ``end`` (inclusive)."""
    if every <= timedelta(0):
        raise SimulationError(f"--every must be longer than 0s, got {format_duration(every)}")
    if start > end:
        raise SimulationError(f"--from ({start.isoformat()}) is after --to ({end.isoformat()})")
    count = (end - start) // every + 1
    if count > MAX_TICKS:
        raise SimulationError(f"{count} ticks from {start.isoformat()} to {end.isoformat()} every "
                              f"{format_duration(every)}: at most {MAX_TICKS}; choose a longer --every or a "
                              "shorter period")
    return [start + every * n for n in range(count)]


# -- the scratch copy ----------------------------------------------------------------

def scratch_copy(source: Engine, path: Path) -> Engine:
    """A copy of the store in a new SQLite file at ``path``, and its engine.

    A SQLite store is copied page by page with SQLite's backup API (a read transaction on
    the source, so a consistent copy while others write). Any other store is read table by
    table in one read-only, repeatable-read transaction (one snapshot for every table),
    ``COPY_CHUNK`` rows at a time, into a file migrated to the same schema.
    """
    if current(source) != head(source):
        raise SimulationError(f"the store is at migration {current(source)}, the code expects {head(source)}: "
                              "run `lifecycle db upgrade` first")
    if source.dialect.name == "sqlite":
        _backup(source, path)
        return make_engine(f"sqlite:///{path}")
    target = make_engine(f"sqlite:///{path}")
    create_schema(target)
    _stream(source, target)
    return target


def _backup(source: Engine, path: Path) -> None:
    raw = source.raw_connection()
    try:
        reading = raw.driver_connection
        assert isinstance(reading, sqlite3.Connection)
        target = sqlite3.connect(path)
        try:
            reading.backup(target)
        finally:
            target.close()
    finally:
        raw.close()


def _stream(source: Engine, target: Engine) -> None:
    options: dict[str, Any] = {"isolation_level": "REPEATABLE READ"}
    if source.dialect.name == "postgresql":
        options["postgresql_readonly"] = True  # the server itself refuses any write
    with source.connect().execution_options(**options) as reading, target.begin() as writing:
        for table in SQLModel.metadata.sorted_tables:  # parents before the rows that name them
            rows = reading.execution_options(yield_per=COPY_CHUNK).execute(select(table))
            for chunk in rows.partitions():
                writing.execute(table.insert(), [row._asdict() for row in chunk])


def _forget_from(engine: Engine, trigger: str, start: datetime) -> None:
    """The trigger's rows evaluated from ``start`` on (and the clicks, attributions and
    experiment looks that follow from them) are the period's to decide: removed from the copy."""
    later = select(col(Send.id)).where(col(Send.trigger) == trigger, col(Send.evaluated_at) >= start)
    with engine.begin() as connection:
        connection.execute(delete(Engagement).where(col(Engagement.send_id).in_(later)))
        connection.execute(delete(Attribution).where(col(Attribution.send_id).in_(later)))
        connection.execute(delete(ExperimentLook).where(col(ExperimentLook.trigger) == trigger,
                                                        col(ExperimentLook.decided_at) >= start))
        connection.execute(delete(Send).where(col(Send.trigger) == trigger, col(Send.evaluated_at) >= start))


@contextmanager
def scratch_store(source: Engine, trigger: str, start: datetime) -> Iterator[tuple[Engine, float]]:
    """The scratch copy for one simulation, and the seconds the copy took; deleted afterwards."""
    with tempfile.TemporaryDirectory(prefix="lifecycle-simulate-") as folder:
        began = time.perf_counter()
        engine = scratch_copy(source, Path(folder) / "scratch.db")
        try:
            _forget_from(engine, trigger, start)
            yield engine, time.perf_counter() - began
        finally:
            engine.dispose()


# -- the dispatch step that sends nothing ----------------------------------------------

def accept_everything(context: RunContext, prepared: Sequence[Prepared], batch: int = 0) -> Counts:
    """The dispatch step of a simulation: claim (handed over) and record each mail as the relay's
    acceptance would (``sent``), in the scratch store; no connection is made. A customer who
    withdrew is skipped as a real dispatch skips them."""
    engine = context.engine
    counts: Counts = Counter()
    gone = withdrawn(engine, context.kind, [p.candidate.customer_id for p in prepared])
    for p in prepared:
        if p.candidate.customer_id in gone:
            counts[(p.candidate.stage, Outcome.UNSUBSCRIBED)] += 1
    prepared = [p for p in prepared if p.candidate.customer_id not in gone]
    handed = claims.hand_over(engine, [p.claim for p in prepared], context.run_id, context.now,
                              context.settings.claim_lease)
    claims.record(engine, [claims.Decision(key, SendStatus.SENT, reply=SIMULATED_REPLY) for key in sorted(handed)])
    for p in prepared:
        counts[(p.candidate.stage, Outcome.SENT if p.claim.send_key in handed else Outcome.ALREADY_SENT)] += 1
    return counts


# -- what the simulation found --------------------------------------------------------

@dataclass
class StepTally:
    """One step over the whole timeline, from the scratch ledger: where its customers ended."""

    step: str  # "" for a trigger's one mail
    branch: str = ""  # for a step that opens a branch: which, e.g. "after welcome: clicked=welcome"
    sent: int = 0
    held_out: int = 0
    passed: int = 0  # its conditions did not hold: the journey went on
    deferred: int = 0  # still held by the policy or its time of day at the end
    exited: Counter[str] = field(default_factory=Counter)  # goal → customers
    other: Counter[str] = field(default_factory=Counter)  # failed, expired…
    variants: Counter[str] = field(default_factory=Counter)  # arm → customers mailed

    @property
    def reached(self) -> int:
        """Customers whose turn for this step came: whatever became of it."""
        return (self.sent + self.held_out + self.passed + self.deferred + sum(self.exited.values())
                + sum(self.other.values()))

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "branch": self.branch, "reached": self.reached, "sent": self.sent,
                "held_out": self.held_out, "passed": self.passed, "exited": dict(self.exited),
                "deferred": self.deferred, "other": dict(self.other), "variants": dict(self.variants)}


@dataclass
class Tick:
    """One run of the timeline: who entered, and each step's outcomes as the run counted them."""

    at: datetime
    entered: int
    steps: dict[str, Counter[Outcome]]

    def mails(self, step: str) -> int:
        return self.steps.get(step, Counter())[Outcome.SENT]

    @property
    def exited(self) -> int:
        return sum(counts[Outcome.EXITED] for counts in self.steps.values())

    @property
    def active(self) -> bool:
        return bool(self.entered or self.exited or any(self.mails(step) for step in self.steps))


@dataclass
class Simulation:
    trigger: str
    start: datetime
    end: datetime
    every: timedelta
    steps: list[StepTally]
    ticks: list[Tick]
    copy_seconds: float
    run_seconds: float

    @property
    def entered(self) -> int:
        return self.steps[0].reached if self.steps else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "trigger": self.trigger, "from": self.start.isoformat(), "to": self.end.isoformat(),
            "every": format_duration(self.every), "ticks": len(self.ticks), "entered": self.entered,
            "steps": [s.to_json() for s in self.steps],
            "timeline": [{"at": t.at.isoformat(), "entered": t.entered,
                          "steps": {step: {str(o): n for o, n in sorted(c.items()) if n} for step, c in t.steps.items()
                                    if any(c.values())}}
                         for t in self.ticks if t.active],
            "seconds": {"copy": round(self.copy_seconds, 3), "runs": round(self.run_seconds, 3)},
        }


def describe(when: When) -> str:
    """A branch's conditions as one short line: ``clicked=welcome, min_cart_value=80``."""
    parts = []
    for name, value in when.model_dump(exclude_none=True).items():
        shown = "|".join(map(str, value)) if isinstance(value, list) else (
            ",".join(f"{k}:{v}" for k, v in value.items()) if isinstance(value, dict) else str(value))
        parts.append(f"{name}={shown}")
    return ", ".join(parts)


def _branch(plan: StepPlan) -> str:
    if not plan.opens_branch:
        return ""
    return f"after {plan.previous}: " + (describe(plan.branch) if plan.branch is not None else "else")


def _tallies(engine: Engine, context: RunContext, runs: str) -> list[StepTally]:
    """Each step's rows that the simulation's runs decided (their run ids start with ``runs``)."""
    journey = context.trigger.journey
    tallies = ({p.name: StepTally(p.name, _branch(p)) for p in plans(journey)} if journey is not None
               else {ONE_MAIL: StepTally(ONE_MAIL)})
    query = (select(col(Send.step), col(Send.status), col(Send.error), col(Send.variant), func.count())
             .where(col(Send.trigger) == context.trigger.name, col(Send.run_id).startswith(runs))
             .group_by(col(Send.step), col(Send.status), col(Send.error), col(Send.variant)))
    with engine.connect() as connection:
        found = connection.execute(query).all()
    for step, status, error, variant, count in found:
        tally = tallies.get(step) or tallies.setdefault(step, StepTally(step))
        if status in (SendStatus.SENT, SendStatus.BOUNCED, SendStatus.COMPLAINED):
            tally.sent += count
            if variant:
                tally.variants[variant] += count
        elif status == SendStatus.HELD_OUT:
            tally.held_out += count
        elif status == SendStatus.PASSED:
            tally.passed += count
        elif status == SendStatus.DEFERRED:
            tally.deferred += count
        elif status == SendStatus.EXITED:
            tally.exited[error.removeprefix("exit: ") or "goal"] += count
        else:
            tally.other[status] += count
    return list(tallies.values())


def _entries(engine: Engine, trigger: str, first: str, after: int) -> tuple[int, int]:
    """New entries since the row id ``after`` (rows of the first step, inserted by this tick),
    and the newest row id now: reading by the primary key keeps each tick's count cheap."""
    with engine.connect() as connection:
        newest = connection.execute(select(func.max(col(Send.id)))).scalar_one() or 0
        entered = connection.execute(select(func.count()).where(
            col(Send.id) > after, col(Send.trigger) == trigger, col(Send.step).in_((first, ONE_MAIL)))).scalar_one()
    return entered, newest


def simulate(trigger: str, start: datetime, end: datetime, every: timedelta, *, settings: Settings,
             source: Engine, project: Project | None = None) -> Simulation:
    """Run ``trigger`` at every tick from ``start`` to ``end`` over a scratch copy of the store
    ``source`` and count what its ledger then holds. Nothing is sent; ``source`` is only read.

    A ``SpecError`` names what is wrong with the trigger (an unknown name included) before
    anything is copied; a ``SimulationError`` says why the timeline or the store cannot be run.
    """
    moments = ticks(start, end, every)
    project = project or load(settings, only=[trigger])
    project.trigger(trigger)  # an unknown or broken trigger fails before the copy
    with scratch_store(source, trigger, start) as (scratch, copy_seconds):
        # One process, one store: sender and shard processes would dispatch for real, and open
        # the store by URL.
        local = settings.model_copy(update={"database_url": scratch.url.render_as_string(hide_password=False),
                                            "workers": 1})
        base = prepare(trigger, start, settings=local, project=project, engine=scratch, shards=1)
        assert base.engine is scratch
        runs = f"simulate-{uuid.uuid4().hex[:12]}-"
        first = plans(base.trigger.journey)[0].name if base.trigger.journey is not None else ONE_MAIL
        began, newest, timeline = time.perf_counter(), _entries(scratch, trigger, first, 0)[1], []
        for number, moment in enumerate(moments):
            summary = execute(replace(base, now=moment, run_id=f"{runs}{number:05d}"), dispatch=accept_everything,
                              logger=quiet)
            entered, newest = _entries(scratch, trigger, first, newest)
            steps = summary.steps or {ONE_MAIL: summary.outcomes}
            timeline.append(Tick(moment, entered, steps))
        run_seconds = time.perf_counter() - began
        tallies = _tallies(scratch, base, runs)
    return Simulation(trigger, start, end, every, tallies, timeline, copy_seconds, run_seconds)
