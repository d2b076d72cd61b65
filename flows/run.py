"""A trigger run, Prefect-free: audience → message → send → ledger → summary, batch by batch.

``execute`` wires the stages over one ``RunContext``. It takes the render, dispatch and
submit steps as arguments: the Prefect flows (``flows.surfaces.prefect_flows``) pass
them as tasks (one task per batch, never per recipient); ``run_trigger``, a dry run,
``lifecycle serve`` and an embedding shop pass the plain functions and need no Prefect
at all. A run with more than one batch hands its batches to sender processes
(``send.senders``) and sends alongside them, so every core sends.
"""

import logging
import threading
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import replace
from datetime import datetime
from typing import Any

from flows.analysis import experiment_looks
from flows.audience.holdout import held_out
from flows.audience.query import Candidate, ledger_steps, shared_records, stream_candidates
from flows.audience.shards import split
from flows.audience.variants import winner_takes_all
from flows.content.diagram import mermaid
from flows.feedback.bounces import trigger_complaints
from flows.message.prepare import claim_for, render_candidates
from flows.outcomes import Outcome
from flows.run_context import RunContext, prepare
from flows.send import claims
from flows.send.batch import PLANNED_LINES, BatchOutcome, DispatchStep, RenderStep, deliver, dispatch_prepared
from flows.send.probe import check_smtp
from flows.send.senders import SenderPool
from flows.settings import Settings
from flows.shards import run_slices
from flows.summary import RunSummary
from models import SendStatus
from models.types import utcnow

log = logging.getLogger("lifecycle")

# Hands a batch to a sender process; returns something with ``.result()`` (a Future, a PrefectFuture).
SubmitStep = Callable[[SenderPool, list[Candidate], int], Any]
# Runs a sharded pass's slices elsewhere (flow runs over a work pool: ``prefect_shards``); their summaries in order.
Spread = Callable[[list[RunContext]], list[RunSummary]]
# Told of each batch of a pass as it comes (a shard's progress).
BatchHook = Callable[[Sequence[Candidate]], None]
Logger = logging.Logger | logging.LoggerAdapter[logging.Logger]


def _to_sender(senders: SenderPool, candidates: list[Candidate], batch: int) -> "Future[BatchOutcome]":
    return senders.submit(candidates, batch)


def execute(context: RunContext, render: RenderStep = render_candidates, dispatch: DispatchStep = dispatch_prepared,
            should_stop: Callable[[], bool] = lambda: False, audience: bool = True,
            submit: SubmitStep = _to_sender, logger: Logger = log, steps_wrap_real: bool = False,
            spread: Spread | None = None) -> RunSummary:
    """Run the stages batch by batch over everyone due (``audience=False``: only those whose
    deferral has come due, the deferred sweep). ``should_stop`` is asked between batches
    (graceful shutdown).

    A journey runs one pass per step, in the tree's reading order, each over its own
    audience (``flows.audience.journey``): the entry first, then every later step whose
    wait is over. An experiment's winner rule takes its look as its step's pass begins
    (``flows.analysis.experiment_looks``). The summary counts every pass, step by step.

    A trigger's ``shards`` split each pass over the audience into slices at once
    (``flows.shards``); the other slices send through the real steps, so a caller's own
    ``render``, ``dispatch`` or ``submit`` keeps the pass in one process, unless they only
    wrap the real ones (``steps_wrap_real``: the Prefect tasks). ``spread`` runs the slices
    elsewhere instead (a deployed run: flow runs of its deployment, ``prefect_shards``).
    """
    parts = (render, dispatch, submit)
    real = steps_wrap_real or parts == (render_candidates, dispatch_prepared, _to_sender)
    passes = context.passes()
    if len(passes) == 1 and passes[0].step is None:
        return _execute_pass(context, render, dispatch, should_stop, audience, submit, logger, real, spread)
    summary = RunSummary(context.trigger.name, context.now, context.dry_run)
    if context.trigger.journey is not None:
        summary.diagram = mermaid(context.trigger.journey, context.kind.name)
    for part in passes:
        plan = part.step
        assert plan is not None
        said = None
        if plan.step.experiment is not None:
            winner, said = experiment_looks.decide(part, logger)
            part = replace(part, winner=winner)
        done = _execute_pass(part, render, dispatch, should_stop, audience, submit, logger, real, spread)
        if said:
            done.decisions[plan.name] = said
        summary.absorb(plan.name, done)
        if done.interrupted:
            break
    return summary


def _execute_pass(context: RunContext, render: RenderStep, dispatch: DispatchStep, should_stop: Callable[[], bool],
                  audience: bool, submit: SubmitStep, logger: Logger, real: bool = True,
                  spread: Spread | None = None, on_batch: BatchHook | None = None) -> RunSummary:
    """One pass over one audience: the trigger's one mail, or one journey step's.

    A deferral is decided by the same query and rules as fresh mail; the deferrals whose
    moment has come that a complete pass did not meet are no longer due, and are closed
    (``claims.close_deferred``).

    The first batch is sent here. If another full batch follows, ``LIFECYCLE_WORKERS - 1``
    sender processes start: each works on one batch and has one more queued (``submit``);
    when they are all busy, this process sends the next batch itself. So every core sends,
    and the audience is read ahead by at most two batches per sender: memory stays flat
    however large the audience.
    """
    # Not the deferred sweep's few: slices cost their processes' start, every few minutes.
    if context.shards > 1 and context.shard is None and audience:
        if real or spread is not None:
            return _execute_sharded(context, render, dispatch, should_stop, audience, submit, logger, spread)
        logger.info("Reading the audience in one process, not %d slices: this run's own steps would not be "
                    "used by the other slices", context.shards)
    log = logger
    settings, engine = context.settings, context.engine
    summary = RunSummary(context.trigger.name, context.now, context.dry_run)
    step = context.step.name if context.step is not None else ""
    steps = ledger_steps(context.step)
    log.info("Evaluating %s (%s%s%s) as of %s%s", context.trigger.name, context.trigger.kind,
             f", step {step}" if step else "", f", shard {context.shard.label}" if context.shard else "",
             context.now.isoformat(), " (dry run)" if context.dry_run else "")

    def finish(number: int, size: int, due: int, why: str, outcome: BatchOutcome) -> None:
        summary.merge(outcome.counts)
        summary.templates.update(outcome.templates)
        summary.planned.extend(outcome.planned[: PLANNED_LINES - len(summary.planned)])
        for failure in outcome.failures:
            log.warning("Customer %s not rendered: %s", failure.candidate.external_id, failure.message)
        log.info("Batch %d: %d candidates, %d due (skipped: %s), %d not renderable",
                 number, size, due, why, len(outcome.failures))

    def hand_over(pool: SenderPool, number: int, size: int, due: list[Candidate], why: str) -> None:
        future, done = submit(pool, due, number), threading.Event()
        future.add_done_callback(lambda _: done.set())
        pending.append((number, size, len(due), why, future, done))

    def settle(finished_only: bool) -> None:
        while pending and (pending[0][5].is_set() or not finished_only):
            number, size, due, why, future, _ = pending.popleft()
            finish(number, size, due, why, future.result())

    parallel = settings.workers > 1 and not context.dry_run
    senders: SenderPool | None = None
    pending: deque[tuple[int, int, int, str, Any, threading.Event]] = deque()  # handed to senders, oldest first
    deferrals = _Deferrals(claims.awaiting_keys(engine, context.trigger.name, context.now, steps, context.shard))
    with ExitStack() as stack:
        batches = stream_candidates(engine, context.trigger, context.kind, context.stages, context.now,
                                    settings.batch_size, settings.default_language, context.policy,
                                    deferred_only=not audience, lease=settings.claim_lease,
                                    languages=context.catalog.languages_for(context.email), step=context.step,
                                    shard=context.shard)
        stack.callback(batches.close)  # on every way out, a failure too: it holds a connection
        for number, batch in enumerate(batches, start=1):
            if should_stop():
                log.warning("Stopping before batch %d: shutdown requested; the next run carries on", number)
                summary.interrupted = True
                break
            if on_batch is not None:
                on_batch(batch)
            deferrals.met(batch)
            due, why = _classify(context, batch, summary)
            if not due:
                log.info("Batch %d: %d candidates, none due (skipped: %s)", number, len(batch), why)
                continue
            if senders is None and parallel and number > 1 and len(batch) == settings.batch_size:
                log.info("Starting %d sender process(es) for a large audience", settings.workers - 1)
                senders = stack.enter_context(SenderPool(context, settings.workers - 1))
            if senders is not None:
                settle(finished_only=True)
                if len(pending) < 2 * senders.workers:  # one at work and one queued per sender
                    hand_over(senders, number, len(batch), due, why)
                    continue
            finish(number, len(batch), len(due), why, deliver(context, due, number, render, dispatch))
        settle(finished_only=False)  # a shutdown too lets the batches already handed over finish
    if not summary.interrupted:  # only a pass over the whole audience knows what is no longer due
        closed = claims.close_deferred(engine, context.trigger.name, context.now, deferrals.awaiting,
                                       deferrals.handled, deferrals.expired, context.dry_run, steps)
        for stage, reason in closed:
            summary.add(stage, Outcome.EXPIRED if reason == claims.EXPIRED_AFTER else Outcome.NO_LONGER_DUE)
        if closed:
            log.info("%d deferred send(s) closed unsent: past deferred_expires_after, or no longer due", len(closed))
    log.info(summary.headline())
    return summary


def _execute_sharded(context: RunContext, render: RenderStep, dispatch: DispatchStep,
                     should_stop: Callable[[], bool], audience: bool, submit: SubmitStep,
                     logger: Logger, spread: Spread | None) -> RunSummary:
    """One pass in ``context.shards`` slices, their summaries added up: at once in processes
    of this machine (``flows.shards``), or run elsewhere by ``spread``. The mailboxes several
    records share are read once, here, so every slice agrees on them; on this machine the
    cores are shared out, each slice starting its own senders from its share."""
    if spread is not None:
        logger.info("Spreading the audience over %d shards", context.shards)
        parts = spread(slices(context))
    else:
        logger.info("Reading the audience in %d slices at once", context.shards)
        parts = run_slices(context.shards, lambda: slices(context), should_stop=should_stop, audience=audience,
                           here=lambda c: _execute_pass(c, render, dispatch, should_stop, audience, submit, logger))
    summary = RunSummary(context.trigger.name, context.now, context.dry_run)
    for part in parts:
        summary.combine(part, PLANNED_LINES)
    logger.info("All %d slices: %s", context.shards, summary.headline())
    return summary


def slices(context: RunContext) -> list[RunContext]:
    """The contexts of a pass's slices: the shared mailboxes read once, the cores shared out."""
    with context.engine.connect() as connection:
        members, shared = shared_records(connection)
    settings = context.settings.model_copy(update={"workers": max(1, context.settings.workers // context.shards)})
    return [replace(context, settings=settings, shard=shard) for shard in split(context.shards, members, shared)]


def execute_slice(context: RunContext, *, audience: bool, should_stop: Callable[[], bool],
                  on_batch: BatchHook | None = None, logger: Logger = log) -> RunSummary:
    """One slice of one pass, as a shard runs it (the real render and dispatch steps)."""
    return _execute_pass(context, render_candidates, dispatch_prepared, should_stop, audience, _to_sender, logger,
                         on_batch=on_batch)


class _Deferrals:
    """The deferrals of this trigger awaiting as the run began, and those it met in its
    audience (the rest are no longer due)."""

    def __init__(self, awaiting: set[str]) -> None:
        self.awaiting = awaiting
        self.handled: set[str] = set()
        self.expired: set[str] = set()

    def met(self, batch: Sequence[Candidate]) -> None:
        for c in batch:
            if c.deferred:
                self.handled.add(c.send_key)
                if c.skip is Outcome.EXPIRED:
                    self.expired.add(c.send_key)


def _classify(context: RunContext, batch: Sequence[Candidate], summary: RunSummary) -> tuple[list[Candidate], str]:
    """Count the skipped, record what the policy deferred and who is held out; returns who
    is due and why the rest are not.

    The holdout is drawn among those who would be mailed now, after consent, suppression,
    re-entry and the policy: both groups are alike in everything but the mail. A deferral
    is drawn when its moment comes, like a fresh occurrence. A journey's held-out customers
    are held out of every step (the same draw), its own arm beside the experiment's
    variants, which are drawn among the mailed (``flows.audience.variants``). A journey step
    decided without a mail (passed, exited) is recorded, so the journey goes on or ends.
    """
    due, deferred, held, closed = [], [], [], []
    reasons: Counter[Outcome] = Counter()
    trigger = context.trigger
    plan = context.step
    weights = plan.variant_weights() if plan is not None else []
    salt = (plan.step.experiment.salt or "") if plan is not None and plan.step.experiment else ""
    for candidate in batch:
        if candidate.skip is None:
            if held_out(trigger.holdout, trigger.name, trigger.salt, candidate.external_id):
                held.append(candidate)
            else:
                if weights and plan is not None:
                    candidate = candidate._replace(variant=winner_takes_all(
                        context.winner, weights, trigger.name, plan.name, salt, candidate.external_id))
                due.append(candidate)
            continue
        reasons[candidate.skip] += 1
        summary.add(candidate.stage, candidate.skip)
        if candidate.skip in (Outcome.QUIET_HOURS, Outcome.FREQUENCY_CAP, Outcome.TIME_OF_DAY):
            deferred.append(candidate)
        elif candidate.skip in (Outcome.CONDITION_NOT_MET, Outcome.EXITED) and candidate.email:
            closed.append(candidate)
    if closed and not context.dry_run:
        claims.close_steps(context.engine, [
            (claim_for(context, c), SendStatus.EXITED if c.skip is Outcome.EXITED else SendStatus.PASSED,
             f"exit: {c.reason}" if c.reason else "") for c in closed], context.run_id, context.now)
    if deferred and not context.dry_run:
        after = context.trigger.deferred_expires_after
        expires = context.now + after if after else None
        claims.defer(context.engine, [_deferral(context, c, expires) for c in deferred], context.run_id, context.now)
    if held:
        won = ({c.send_key for c in held} if context.dry_run else
               claims.hold_out(context.engine, [claim_for(context, c) for c in held], context.run_id, context.now,
                               context.settings.claim_lease))
        for c in held:
            outcome = Outcome.HELD_OUT if c.send_key in won else Outcome.ALREADY_SENT
            reasons[outcome] += 1
            summary.add(c.stage, outcome)
    labels = sorted((reason.removeprefix("skipped:"), n) for reason, n in reasons.items())  # "no_email 3, held_out 2"
    return due, ", ".join(f"{label} {n}" for label, n in labels) or "none"


def _deferral(context: RunContext, c: Candidate,
              expires: datetime | None) -> tuple[claims.Claim, datetime, datetime | None]:
    assert c.not_before is not None  # a candidate held back by the policy has the moment it may go
    return claim_for(context, c), c.not_before, expires


def run_trigger(trigger: str, *, settings: Settings, now: datetime | None = None, dry_run: bool = False,
                should_stop: Callable[[], bool] = lambda: False) -> RunSummary:
    """Run one trigger to the end without Prefect: validate, check the relay, send, count.

    What ``lifecycle run`` does through Prefect, for a shop that embeds Lifecycle in its
    own scheduler: ``run_trigger("abandoned-cart", settings=Settings())``.
    """
    context = prepare(trigger, now or utcnow(), settings=settings, dry_run=dry_run)
    return run(context, should_stop=should_stop)


def run(context: RunContext, *, should_stop: Callable[[], bool] = lambda: False, logger: Logger = log,
        render: RenderStep = render_candidates, dispatch: DispatchStep = dispatch_prepared,
        submit: SubmitStep | None = None, steps_wrap_real: bool = False, spread: Spread | None = None) -> RunSummary:
    """A whole run over a prepared context: the relay checked first (unless a dry run),
    every batch sent, and the trigger's recent complaint rate attached to the summary."""
    if not context.dry_run:
        check_smtp(context.settings)
    summary = execute(context, render=render, dispatch=dispatch, should_stop=should_stop, logger=logger,
                      submit=submit or _to_sender, steps_wrap_real=steps_wrap_real, spread=spread)
    summary.complaints = (None if context.dry_run
                          else trigger_complaints(context.engine, context.trigger.name, context.now))
    return summary
