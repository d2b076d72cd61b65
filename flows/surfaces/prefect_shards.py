"""Shards over a work pool: a deployed run's slices as flow runs of its own deployment.

A deployed run of a trigger with ``shards: N`` (or the ``shards`` parameter) reads no
audience itself. For each pass it starts N flow runs of its own deployment
(``run_deployment``), one per slice, for any worker of the pool, on any machine, to pick
up; it waits for them and adds their summaries up into its own artifacts. A slice's
parameters (``ShardOrder``) say which pass and slice it is, with the customer records that
share a mailbox, read once by the parent so that every slice agrees on them (ids only:
parameters show in the UI).

Exactly-once is the ledger's, as for slices in processes (``flows.shards``): a slice claims
every send before it goes, so a slice run twice (a retry, a lost worker's run) sends
nothing twice.

A slice reports its progress as a progress artifact after every batch: ops see how far each
shard is, and the parent sees that it is alive. A slice run that fails or crashes is run
again, up to ``LIFECYCLE_SHARD_ATTEMPTS`` runs. One whose progress stands still for
``LIFECYCLE_SHARD_STALL_SECONDS`` (its worker killed, its machine gone: Prefect would show
it Running for ever) gets another run beside it; whichever finishes first counts, and one
that never does is marked Crashed. A slice out of attempts fails the parent once the
others are done: what they sent stays sent, and the next run carries on.
"""

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import copy_context
from dataclasses import dataclass, field, replace
from typing import Any
from uuid import UUID

from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterType,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.deployments import run_deployment
from prefect.states import Cancelled, Crashed
from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlmodel import col

from flows.audience.query import Candidate, mailboxes_of
from flows.audience.shards import Shard
from flows.redaction import redact
from flows.run import Logger, execute_slice
from flows.run_context import RunContext
from flows.summary import RunSummary
from flows.surfaces.deployments import artifact_key
from models import Customer, Send, SendStatus
from models.db import one_of

log = logging.getLogger("lifecycle")

SLICE_ARTIFACT = "shard-summary"  # the key's suffix of a slice's summary artifact


class ShardOrder(BaseModel):
    """What a slice's flow run is to do: which slice of which pass."""

    index: int = Field(ge=0, description="The slice, from 0.")
    count: int = Field(ge=2, le=64, description="Slices of the pass.")
    step: str | None = Field(None, description="A journey's step (its pass); none for a trigger's one mail.")
    winner: str | None = Field(None, description="The step's experiment winner, as the parent's look decided.")
    members: list[int] = Field(default_factory=list, description="Customer records sharing a mailbox (slice 0's).")
    store: str = Field("", description="The parent's store (a digest of its URL, no password): a shard "
                                       "refuses another, whose ledger could not keep it from sending twice.")

    @property
    def label(self) -> str:
        return f"{self.index + 1}/{self.count}"


class ShardFailed(RuntimeError):
    """A slice ran out of attempts."""


def order_for(context: RunContext) -> ShardOrder:
    """The order of a slice's context (``flows.run.slices``)."""
    shard = context.shard
    if shard is None:
        raise ValueError("a context without a shard has no shard's order")
    return ShardOrder(index=shard.index, count=shard.count, step=context.step.name if context.step else None,
                      winner=context.winner, members=sorted(shard.members), store=store_digest(context))


def store_digest(context: RunContext) -> str:
    """Which store a run uses, without its password: a shard's must be its parent's."""
    url = context.engine.url.render_as_string(hide_password=True)
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def slice_context(context: RunContext, order: ShardOrder) -> RunContext:
    """The context of the ordered slice, from this run's own (its settings, its machine's)."""
    if order.store and order.store != store_digest(context):
        raise ValueError(f"shard {order.label} was started for another store than this worker's "
                         "LIFECYCLE_DATABASE_URL: every worker of the pool needs the parent's store")
    passes = {part.step.name if part.step else None: part for part in context.passes()}
    if order.step not in passes:
        raise ValueError(f"{context.trigger.name} has no step {order.step!r}: the trigger changed since its run "
                         "began")
    with context.engine.connect() as connection:
        shared = mailboxes_of(connection, order.members)
    shard = Shard(order.index, order.count, frozenset(order.members), shared)
    return replace(passes[order.step], winner=order.winner, shards=order.count, shard=shard)


class Progress:
    """A slice's progress artifact: the share of its customer ids passed, after every batch
    (at most once a second), as ops and the parent see it."""

    def __init__(self, context: RunContext, every: float = 1.0) -> None:
        self.label = context.shard.label if context.shard else "?"
        with context.engine.connect() as connection:
            low, high = connection.execute(select(func.min(Customer.id), func.max(Customer.id))).one()
        self.low, self.high = low or 0, high or 0
        self.every, self.last, self.batches = every, 0.0, 0
        made = create_progress_artifact(0.0, description=f"shard {self.label}: starting")
        assert isinstance(made, UUID)  # called from sync code: the value, not a coroutine
        self.id = made

    def batch(self, batch: Sequence[Candidate]) -> None:
        self.batches += 1
        if not batch or time.monotonic() - self.last < self.every:
            return
        span = max(1, self.high - self.low)
        share = min(100.0, max(0.0, 100.0 * (batch[-1].customer_id - self.low) / span))
        self._show(share, f"batch {self.batches}")
        self.last = time.monotonic()

    def done(self) -> None:
        self._show(100.0, f"done, {self.batches} batch(es)")

    def _show(self, share: float, what: str) -> None:
        """Shown, or logged when the API does not answer: a send never waits on its telemetry
        (the parent sees a shard that cannot report as stalled, and runs another beside it)."""
        try:
            update_progress_artifact(self.id, share, description=f"shard {self.label}: {what}")
        except Exception as error:  # noqa: BLE001 - any API failure; the batches go on
            log.warning("Shard %s: progress not reported (%s)", self.label, error)


def run_slice(context: RunContext, order: ShardOrder, logger: Logger) -> RunSummary:
    """The ordered slice of one pass, in this flow run; its summary as an artifact for the parent."""
    part = slice_context(context, order)
    progress = Progress(part)
    summary = execute_slice(part, audience=True, should_stop=lambda: False, on_batch=progress.batch, logger=logger)
    progress.done()
    create_markdown_artifact(key=f"{artifact_key(context.trigger.name)}-{SLICE_ARTIFACT}",
                             description=f"shard {order.label}: {summary.state_message()}",
                             markdown=slice_markdown(summary, order))
    return summary


def slice_markdown(summary: RunSummary, order: ShardOrder) -> str:
    """A slice's summary artifact: its headline for people, its record for the parent (``read_record``)."""
    record = json.dumps(summary.to_record(), sort_keys=True)
    where = f"Shard {order.label}" + (f", step {order.step}" if order.step else "")
    return f"# {summary.headline()}\n\n{where}. The parent run adds this up:\n\n```json\n{record}\n```\n"


def read_record(markdown: str) -> RunSummary:
    """The summary a slice's artifact carries (``slice_markdown``)."""
    start = markdown.index("```json\n") + len("```json\n")
    return RunSummary.from_record(json.loads(markdown[start:markdown.index("\n```", start)]))


_CHUNK = 50  # runs per API read: their artifacts (two each) stay within the server's 200 rows a page


@dataclass
class _Run:
    """One flow run of a slice, as the parent watches it."""

    id: UUID
    alive_at: float  # when the parent last saw it change (its own clock: no skew between machines)
    seen: tuple[Any, ...] | None = None  # its state and progress as last seen
    stalled: bool = False  # stood still past the limit: another run was started, this one is still watched
    over: bool = False  # ended (the one that counted, or one that failed)


@dataclass
class _Slice:
    context: RunContext
    order: ShardOrder
    runs: list[_Run] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    summary: RunSummary | None = None
    counted: str = ""  # the run whose summary counts ("here": the parent's own process)
    cancelled: bool = False  # an operator cancelled one of its runs: never started again

    @property
    def live(self) -> list[_Run]:
        return [r for r in self.runs if not r.over]

    @property
    def waiting(self) -> bool:
        return self.summary is None and bool(self.live)


class PoolShards:
    """The slices of a pass as flow runs of ``deployment``, any worker's (``flows.run.Spread``).

    A run that stalls is not given up on: another is started beside it, and whichever
    finishes first counts (the ledger keeps them from sending anything twice). So a slow
    run (a loaded machine) costs some work twice, never a mail. Runs that stalled and
    never finished are marked Crashed at the end. A slice that no worker takes within the
    stall limit (every slot busy, the pool paused) runs in the parent's own process, which
    holds a slot already. A cancelled run is the operator's word: its slice is not run
    again, and the parent fails. ``key`` makes the runs' idempotency keys (the parent's
    id and run count): a parent that Prefect retries starts its shards anew, and one that
    only resumes finds the runs it started."""

    def __init__(self, deployment: UUID, key: str, tags: Sequence[str], *, attempts: int, stall: float,
                 poll: float = 1.0, logger: Logger = log) -> None:
        self.deployment, self.key, self.tags = deployment, key, list(tags)
        self.attempts, self.stall, self.poll, self.log = attempts, stall, poll, logger
        self.report: list[dict[str, Any]] = []  # one row per slice and pass, for the parent's artifact

    def __call__(self, contexts: list[RunContext]) -> list[RunSummary]:
        slices = [_Slice(c, order_for(c)) for c in contexts]
        # Each start in a copy of this thread's context, taken here (a thread of the pool has its
        # own, empty one): a run started without the flow run's context would not be linked to
        # it as a subflow, and cancelling the parent would not reach it.
        copies = [copy_context() for _ in slices]
        with ThreadPoolExecutor(len(slices), thread_name_prefix="shard-start") as starting:
            list(starting.map(lambda copy, each: copy.run(self._start, each), copies, slices))
        with get_client(sync_client=True) as client:
            while pending := [s for s in slices if s.waiting]:
                time.sleep(self.poll)
                self._look(client, pending)
            for each in slices:
                self._bury(client, each)
        others = _sent_by(contexts[0], [str(r.id) for s in slices for r in s.runs if str(r.id) != s.counted])
        for each in slices:
            self.report.append({"step": each.order.step or "", "shard": each.order.label, "runs": len(each.runs),
                                "counted run": each.counted,
                                "outcome": each.summary.state_message() if each.summary else
                                "failed: " + redact("; ".join(each.failures))[:500],
                                "sent by its other runs": sum(others[str(r.id)] for r in each.runs)})
        lost = [s for s in slices if s.summary is None]
        if lost:
            raise ShardFailed("; ".join(f"shard {s.order.label}{f' of step {s.order.step}' if s.order.step else ''} "
                                        f"ran {len(s.runs)} time(s): {redact(s.failures[-1])[:300]}" for s in lost)
                              + ". What the other shards sent stays sent; the next run carries on.")
        return [s.summary for s in slices if s.summary is not None]

    def _start(self, each: _Slice) -> bool:
        """Another run of the slice, if it has attempts left."""
        if len(each.runs) >= self.attempts or each.cancelled:
            return False
        context, order = each.context, each.order
        attempt = len(each.runs) + 1
        started = run_deployment(
            self.deployment, timeout=0, as_subflow=True, tags=[*self.tags, f"shard:{order.label}"],
            parameters={"trigger": context.trigger.name, "now": context.now.isoformat(),
                        "dry_run": context.dry_run, "shard": order.model_dump()},
            idempotency_key=f"{self.key}/{order.step or '-'}/{order.index}/{order.count}/{attempt}")
        assert isinstance(started, FlowRun)  # called from sync code: the value, not a coroutine
        each.runs.append(_Run(started.id, time.monotonic()))
        self.log.info("Shard %s%s: flow run %s (attempt %d of %d)", order.label,
                      f" of step {order.step}" if order.step else "", started.id, attempt, self.attempts)
        return True

    def _look(self, client: SyncPrefectClient, pending: list[_Slice]) -> None:
        ids = [r.id for s in pending for r in s.live]
        runs: dict[UUID, FlowRun] = {}
        progress: dict[UUID, tuple[Any, ...]] = {}
        records: dict[UUID, Any] = {}
        for i in range(0, len(ids), _CHUNK):
            chunk = ids[i : i + _CHUNK]
            runs.update((r.id, r) for r in client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=chunk)), limit=len(chunk)))
            for a in client.read_artifacts(artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=chunk), type=ArtifactFilterType(
                        any_=["progress", "markdown"])), limit=2 * len(chunk)):
                if a.flow_run_id is not None:
                    if a.type == "progress":
                        progress[a.flow_run_id] = (a.updated, a.data, a.description)
                    else:
                        records[a.flow_run_id] = a.data
        now = time.monotonic()
        local = []
        for each in pending:
            for run in each.live:
                found = runs.get(run.id)
                state = found.state if found is not None else None
                if found is None:
                    run.over = True
                    self._failed(each, run, "gone from Prefect (deleted?)")
                elif state is not None and state.type is StateType.COMPLETED:
                    run.over = True
                    if each.summary is not None:
                        continue
                    if run.id in records:
                        each.summary, each.counted = read_record(str(records[run.id])), str(run.id)
                    else:
                        self._failed(each, run, "completed without its summary")
                elif state is not None and state.type is StateType.CANCELLED:
                    run.over, each.cancelled = True, True
                    self._failed(each, run, f"cancelled: {state.message or 'no message'}")
                elif state is not None and state.is_final():  # failed, crashed
                    run.over = True
                    self._failed(each, run, f"{state.type.value.lower()}: {state.message or 'no message'}")
                else:  # every state but a final one must move: waiting for a worker too
                    seen = (state.type if state else None, progress.get(run.id))
                    if seen != run.seen:
                        run.seen, run.alive_at, run.stalled = seen, now, False
                    elif not run.stalled and now - run.alive_at > self.stall:
                        run.stalled = True
                        if state is not None and state.type is StateType.SCHEDULED:
                            local.append((each, run))
                        else:
                            self._failed(each, run, f"no progress for {self.stall:.0f} s: its worker is gone, "
                                                    "or hangs")
            if each.waiting and all(r.stalled for r in each.live) and (
                    len(each.runs) >= self.attempts or each.cancelled):
                for run in each.live:  # every run stalled and none is left to start: given up
                    run.over = True
        for each, run in local:
            if each.waiting:
                self._here(client, each, run)
                for other in pending:  # nobody was looked at meanwhile: their clocks start again
                    for r in other.live:
                        r.alive_at = time.monotonic()

    def _here(self, client: SyncPrefectClient, each: _Slice, run: _Run) -> None:
        """A slice no worker took within the stall limit, run in this process instead: its
        run cancelled first (were it taken meanwhile, the ledger still decides every mail)."""
        self.log.warning("Shard %s: no worker took flow run %s within %.0f s; running it in this process",
                         each.order.label, run.id, self.stall)
        client.set_flow_run_state(run.id, Cancelled(
            message="Lifecycle: no worker took it in time; its parent ran the shard itself"), force=True)
        run.over = True
        each.summary = execute_slice(each.context, audience=True, should_stop=lambda: False, logger=self.log)
        each.counted = "here"

    def _failed(self, each: _Slice, run: _Run, why: str) -> None:
        each.failures.append(why)
        self.log.warning("Shard %s, flow run %s: %s", each.order.label, run.id, redact(why))
        if not [r for r in each.live if not r.stalled] and not self._start(each):
            self.log.error("Shard %s: not run again (%d run(s)%s)", each.order.label, len(each.runs),
                           ", one cancelled" if each.cancelled else "")

    def _bury(self, client: SyncPrefectClient, each: _Slice) -> None:
        """Runs that stalled and never finished marked Crashed, so the UI stops showing them Running."""
        for run in each.runs:
            if run.stalled and str(run.id) != each.counted:
                found = client.read_flow_run(run.id)
                if found.state is None or not found.state.is_final():
                    client.set_flow_run_state(run.id, Crashed(
                        message=f"Lifecycle: no progress for {self.stall:.0f} s (its worker gone, or hanging); "
                                "its shard was run again"), force=True)


def _sent_by(context: RunContext, runs: list[str]) -> Counter[str]:
    """The ledger's sent mails of these runs (the parent counts only the runs that counted:
    what a lost run sent, its replacement found sent)."""
    if not runs:
        return Counter()
    with context.engine.connect() as connection:
        rows = connection.execute(select(col(Send.run_id), func.count()).where(
            one_of(col(Send.run_id), runs, connection.dialect.name), col(Send.status) == SendStatus.SENT)
            .group_by(col(Send.run_id))).all()
    return Counter({run: n for run, n in rows})


def spread_for(context: RunContext, deployment: UUID | str | None, parent: UUID | str | None, run_count: int,
               tags: Sequence[str], logger: Logger) -> PoolShards | None:
    """The pool's shards for a run of a deployment: none for a run started in-process, nor
    for a SQLite store (a file: workers on other machines would each open their own)."""
    if not deployment or not parent:
        return None
    if context.engine.dialect.name == "sqlite":
        if context.shards > 1:
            logger.warning("Slicing in processes of this worker, not over the pool: the store is a SQLite file, "
                           "which the pool's other machines cannot share (use PostgreSQL)")
        return None
    settings = context.settings
    return PoolShards(UUID(str(deployment)), f"{parent}/{run_count}", tags, attempts=settings.shard_attempts,
                      stall=settings.shard_stall_seconds, logger=logger)
