"""A trigger run: audience → render → dispatch → ledger → summary, then the sends the
policy deferred whose moment has come.

``execute`` wires the stages; the per-batch work lives in ``delivery``. It takes the
render and dispatch steps as arguments: the Prefect flow passes them as tasks (one
task per batch, never per recipient), a dry run passes the plain functions and needs
no Prefect server at all. A run with more than one batch hands its batches to sender
processes (``senders``) and sends alongside them, so every core sends.
"""

import logging
import threading
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import ExitStack
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.utilities.annotations import quote

from flows.send import claims as ledger
from flows.audience.query import Candidate, Skip, stream_candidates
from flows.feedback.bounces import trigger_complaints
from flows.clock import parse_now
from flows.send.batch import (
    PLANNED_LINES,
    BatchOutcome,
    Job,
    check_smtp,
    claim_for,
    deliver,
    dispatch_prepared,
    load,
    prepare_job,
    render_candidates,
)
from flows.content.links import preview_url
from flows.memory import one_malloc_arena
from flows.redaction import redact_every_record
from flows.summary import RunSummary, skipped
from flows.send.senders import SenderPool
from flows.settings import Settings, get_settings
from flows.spec.common import TriggerBase
from models.db import get_engine
from models.types import utcnow

one_malloc_arena()  # before Prefect starts the run's threads (see flows.memory)
redact_every_record()  # no password or token in any log record, Prefect's API log included (flows.redaction)

__all__ = ["Job", "compile_flow", "deferred_flow", "dispatch_prepared", "execute", "load", "prepare_job",
           "render_candidates", "trigger_flow"]


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("lifecycle")


# -- the run -----------------------------------------------------------------------

RenderStep = Callable[..., Any]
DispatchStep = Callable[..., Counter[tuple[str, str]]]
# Hands a batch to a sender process; returns something with ``.result()`` (a Future, a PrefectFuture).
SubmitStep = Callable[[SenderPool, list[Candidate], int], Any]


def _to_sender(senders: SenderPool, candidates: list[Candidate], batch: int) -> "Future[BatchOutcome]":
    return senders.submit(candidates, batch)


def execute(job: Job, render: RenderStep = render_candidates, dispatch: DispatchStep = dispatch_prepared,
            should_stop: Callable[[], bool] = lambda: False, audience: bool = True,
            submit: SubmitStep = _to_sender) -> RunSummary:
    """Run the stages batch by batch over everyone due (``audience=False``: only those whose
    deferral has come due, the deferred sweep). ``should_stop`` is asked between batches
    (graceful shutdown).

    A deferral is decided by the same query and rules as fresh mail; the deferrals whose
    moment has come that a complete pass did not meet are no longer due, and are closed
    (``ledger.close_deferred``).

    The first batch is sent here. If another full batch follows, ``LIFECYCLE_WORKERS - 1``
    sender processes start: each works on one batch and has one more queued (``submit``);
    when they are all busy, this process sends the next batch itself. So every core sends,
    and the audience is read ahead by at most two batches per sender: memory stays flat
    however large the audience.
    """
    log = _logger()
    settings = job.settings
    engine = get_engine(settings.database_url)
    summary = RunSummary(job.trigger.name, job.now, job.dry_run)
    log.info("Evaluating %s (%s) as of %s%s", job.trigger.name, job.trigger.kind, job.now.isoformat(),
             " (dry run)" if job.dry_run else "")

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

    parallel = settings.workers > 1 and not job.dry_run
    senders: SenderPool | None = None
    pending: deque[tuple[int, int, int, str, Any, threading.Event]] = deque()  # handed to senders, oldest first
    deferrals = _Deferrals(ledger.awaiting_keys(engine, job.trigger.name, job.now))
    with ExitStack() as stack:
        batches = stream_candidates(engine, job.trigger, job.kind, job.stages, job.now, settings.batch_size,
                                    settings.default_language, job.policy, deferred_only=not audience,
                                    lease=settings.claim_lease, languages=job.catalog.languages_for(job.trigger.email))
        stack.callback(batches.close)  # on every way out, a failure too: it holds a connection
        for number, batch in enumerate(batches, start=1):
            if should_stop():
                log.warning("Stopping before batch %d: shutdown requested; the next run carries on", number)
                summary.interrupted = True
                break
            deferrals.met(batch)
            due, why = _classify(job, batch, summary)
            if not due:
                log.info("Batch %d: %d candidates, none due (skipped: %s)", number, len(batch), why)
                continue
            if senders is None and parallel and number > 1 and len(batch) == settings.batch_size:
                log.info("Starting %d sender process(es) for a large audience", settings.workers - 1)
                senders = stack.enter_context(SenderPool(job, settings.workers - 1))
            if senders is not None:
                settle(finished_only=True)
                if len(pending) < 2 * senders.workers:  # one at work and one queued per sender
                    hand_over(senders, number, len(batch), due, why)
                    continue
            finish(number, len(batch), len(due), why, deliver(job, due, number, render, dispatch))
        settle(finished_only=False)  # a shutdown too lets the batches already handed over finish
    if not summary.interrupted:  # only a pass over the whole audience knows what is no longer due
        closed = ledger.close_deferred(engine, job.trigger.name, job.now, deferrals.awaiting, deferrals.handled,
                                       deferrals.expired, job.dry_run)
        for stage, reason in closed:
            summary.add(stage, skipped(Skip.EXPIRED if reason == ledger.EXPIRED_AFTER else Skip.NO_LONGER_DUE))
        if closed:
            log.info("%d deferred send(s) closed unsent: past deferred_expires_after, or no longer due", len(closed))
    log.info(summary.headline())
    return summary


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
                if c.skip == Skip.EXPIRED:
                    self.expired.add(c.send_key)


def _classify(job: Job, batch: Sequence[Candidate], summary: RunSummary) -> tuple[list[Candidate], str]:
    """Count the skipped, record what the policy deferred; returns who is due and why the rest are not."""
    due, deferred = [], []
    reasons: Counter[str] = Counter()
    for candidate in batch:
        if candidate.skip is None:
            due.append(candidate)
            continue
        reasons[candidate.skip] += 1
        summary.add(candidate.stage, candidate.skip.value if candidate.skip.deferred else skipped(candidate.skip))
        if candidate.skip in (Skip.QUIET_HOURS, Skip.FREQUENCY_CAP):
            deferred.append(candidate)
    if deferred and not job.dry_run:
        expires = job.now + job.trigger.deferred_expires_after if job.trigger.deferred_expires_after else None
        ledger.defer(get_engine(job.settings.database_url),
                     [(claim_for(job, c), c.not_before, expires) for c in deferred], job.run_id, job.now)
    return due, ", ".join(f"{reason} {n}" for reason, n in sorted(reasons.items())) or "none"


def _run_name() -> str:
    parameters = flow_run.parameters
    moment = parse_now(parameters.get("now"))
    suffix = " (dry run)" if parameters.get("dry_run") else ""
    return f"{parameters['trigger']} @ {moment:%Y-%m-%d %H:%M} UTC{suffix}"


def _in_sender(senders: SenderPool, candidates: list[Candidate], batch: int) -> BatchOutcome:
    return senders.submit(candidates, batch).result()


render_batch = task(render_candidates, name="render", task_run_name="render-batch-{batch}", cache_policy=NO_CACHE)
dispatch_batch = task(dispatch_prepared, name="dispatch", task_run_name="dispatch-batch-{batch}", cache_policy=NO_CACHE)
# A batch rendered and sent in a sender process: one task run per batch, submitted so batches overlap.
send_batch = task(_in_sender, name="send", task_run_name="send-batch-{batch}", cache_policy=NO_CACHE)

# The steps as a flow run calls them. Prefect walks every task parameter, element by element,
# looking for futures (about 70 ms and a copy per 2,000 candidates); ``quote`` spares the batch
# and the job that walk: neither can hold a future.


def _render_task(job: Job, candidates: Sequence[Candidate], batch: int = 0) -> Any:
    return render_batch(quote(job), quote(candidates), batch=batch)


def _dispatch_task(job: Job, prepared: Sequence[Any], batch: int = 0) -> Any:
    return dispatch_batch(quote(job), quote(prepared), batch=batch)


def _send_task(senders: SenderPool, candidates: list[Candidate], batch: int) -> Any:
    return send_batch.submit(quote(senders), quote(candidates), batch)


@flow(name="lifecycle-trigger", flow_run_name=_run_name, validate_parameters=True)
def trigger_flow(trigger: str, now: str | None = None, dry_run: bool = False) -> RunSummary:
    """Evaluate one trigger at ``now`` (ISO 8601; default: the current time) and send."""
    settings = get_settings()
    job = prepare_job(trigger, parse_now(now), settings=settings, dry_run=dry_run, run_id=str(flow_run.id or ""))
    if not dry_run:
        check_smtp(settings)
    summary = execute(job, render=_render_task, dispatch=_dispatch_task, submit=_send_task)
    summary.complaints = None if dry_run else trigger_complaints(get_engine(settings.database_url), trigger, job.now)
    publish(summary, job.settings)
    return summary


def _deferred_run_name() -> str:
    return f"deferred sends @ {parse_now(flow_run.parameters.get('now')):%Y-%m-%d %H:%M} UTC"


@flow(name="lifecycle-deferred", flow_run_name=_deferred_run_name, validate_parameters=True)
def deferred_flow(now: str | None = None) -> dict[str, RunSummary]:
    """Send what the policy deferred, for every trigger, as soon as its moment has come
    (scheduled every few minutes, so a deferral does not wait for its trigger's next run)."""
    settings = get_settings()
    moment = parse_now(now)
    project = load(settings)
    summaries = {}
    if any(t.enabled for t in project.triggers.values()):
        check_smtp(settings)
    failed = []
    for name, trigger in project.triggers.items():
        if trigger.enabled:
            try:  # each trigger its own error boundary: one that fails never holds back the others' sends
                job = prepare_job(name, moment, settings=settings, project=project, run_id=str(flow_run.id or ""))
                summaries[name] = execute(job, render=_render_task, dispatch=_dispatch_task, audience=False,
                                          submit=_send_task)
            except Exception as exc:  # noqa: BLE001 -- reported below, after the others had their turn
                _logger().error("Deferred sends of %s failed: %s", name, exc)
                failed.append(name)
    if failed:  # the run is Failed, honestly, once every healthy trigger has sent
        raise RuntimeError(f"deferred sends failed for {', '.join(failed)}; the other triggers' went out")
    return summaries


def compile_flow(trigger: TriggerBase):
    """The trigger as its own Prefect flow, named after it in the UI."""
    return trigger_flow.with_options(name=trigger.name)


def publish(summary: RunSummary, settings: Settings) -> None:
    """Artifacts for the Prefect UI: the summary (with preview links to `lifecycle web`) and the counts."""
    key = "".join(ch if ch.isalnum() else "-" for ch in summary.trigger.lower())
    secret, made = settings.signing_secret, utcnow()  # a preview link expires after its making, not the run's --now

    def preview(stage: str, language: str) -> str:
        return preview_url(settings.base_url, secret, summary.trigger, stage, language, made)

    create_markdown_artifact(key=f"{key}-summary", markdown=summary.to_markdown(preview),
                             description=summary.headline())
    create_table_artifact(key=f"{key}-counts", table=summary.table(), description="Counts per stage and outcome")
