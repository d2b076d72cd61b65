"""A trigger run: audience → render → dispatch → ledger → summary, then the sends the
policy deferred whose moment has come.

``execute`` wires the stages and takes the render and dispatch steps as arguments:
the Prefect flow passes them as tasks (one task per batch, never per recipient), a
dry run passes the plain functions and needs no Prefect server at all.
"""

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from itertools import chain
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from sqlmodel import Session

from flows import ledger
from flows.audience import Candidate, Skip, deferred_due, stream_candidates, withdrawn
from flows.clock import parse_now
from flows.compose import Sender, build_message, message_id
from flows.context import (
    CustomerView,
    Links,
    TriggerView,
    load_carts,
    load_complaints,
    load_latest_orders,
)
from flows.dispatch import (
    Delivery,
    Envelope,
    Mailer,
    Result,
    RetryPolicy,
    SmtpConfig,
    SmtpUnavailable,
)
from flows.dkim_signer import DkimSigner
from flows.kinds import KINDS
from flows.kinds.base import Kind
from flows.links import confirm_url, preferences_url, preview_url, unsubscribe_url
from flows.render import RenderError, TemplateCatalog
from flows.report import (
    RETRY,
    SENT,
    WOULD_SEND,
    PlannedMail,
    RunSummary,
    failed,
    skipped,
)
from flows.settings import Settings, get_settings
from flows.spec.common import TriggerBase
from flows.spec.policy import Policy
from flows.spec.project import Project, load_project
from flows.spec.stages import StageRules
from models import SendStatus, SuppressionReason
from models.db import get_engine
from models.types import utcnow

PLANNED_LINES = 50


@dataclass(frozen=True)
class Job:
    """Everything one run of one trigger needs; immutable for the whole run."""

    trigger: TriggerBase
    kind: Kind
    stages: StageRules
    catalog: TemplateCatalog
    settings: Settings
    now: datetime
    run_id: str
    dry_run: bool = False
    policy: Policy = field(default_factory=Policy)

    @cached_property
    def sender(self) -> Sender:
        return Sender.parse(self.trigger.email.sender or self.settings.sender)

    @cached_property
    def signer(self) -> DkimSigner | None:
        s = self.settings
        key = s.dkim_private_key.get_secret_value() if s.dkim_private_key else None
        return DkimSigner.from_settings(s.dkim_selector, s.dkim_domain, key, s.dkim_private_key_file,
                                        self.sender.domain)


@dataclass(frozen=True, slots=True)
class Prepared:
    candidate: Candidate
    claim: ledger.Claim
    envelope: Envelope
    subject: str


@dataclass(frozen=True, slots=True)
class Failure:
    candidate: Candidate
    reason: str
    message: str


def load(settings: Settings) -> Project:
    return load_project(
        settings.triggers_dir, settings.templates_dir, settings.default_language, settings.base_url, settings.shop_url
    )


def prepare_job(
    trigger_name: str,
    now: datetime,
    *,
    settings: Settings,
    dry_run: bool = False,
    project: Project | None = None,
    run_id: str | None = None,
) -> Job:
    """Validate (the trigger, its templates: a test render of each) before anything is sent."""
    project = project or load(settings)
    trigger = project.trigger(trigger_name)  # SpecError names file, line and field
    assert project.stages is not None  # a trigger only loads when the stage rules did
    return Job(
        trigger=trigger,
        kind=KINDS[trigger.kind],
        stages=project.stages,
        catalog=project.catalog,
        settings=settings,
        now=now,
        run_id=run_id or uuid.uuid4().hex,
        dry_run=dry_run,
        policy=project.policy,
    )


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("lifecycle")


# -- render ------------------------------------------------------------------------

def render_candidates(job: Job, candidates: Sequence[Candidate], batch: int = 0) -> tuple[list[Prepared], list[Failure]]:
    """Render and compose each due candidate; one recipient's bad data fails only that one."""
    settings = job.settings
    engine = get_engine(settings.database_url)
    refs = [c.ref_id for c in candidates if c.ref_id is not None]
    with Session(engine) as session:
        carts = load_carts(session, refs) if job.kind.reference == "cart" else {}
        complaints = load_complaints(session, refs) if job.kind.reference == "complaint" else {}
        orders = load_latest_orders(session, [c.customer_id for c in candidates], job.now)
    sender, secret, date = job.sender, settings.secret.get_secret_value(), utcnow()
    trigger_view = TriggerView(job.trigger.name, job.trigger.description)
    prepared: list[Prepared] = []
    failures: list[Failure] = []
    for c in candidates:
        assert c.email is not None
        customer = CustomerView(c.external_id, c.email, c.first_name, c.last_name, c.locale, c.language)
        links = Links(
            unsubscribe=unsubscribe_url(settings.base_url, secret, c.external_id, job.trigger.kind),
            preferences=preferences_url(settings.base_url, secret, c.external_id),
            shop=settings.shop_url,
            confirm=confirm_url(settings.base_url, secret, c.external_id) if job.kind.reference == "consent" else None,
        )
        context: dict[str, Any] = {
            "customer": customer,
            "stage": c.stage,
            "lang": c.language,
            "cart": carts.get(c.ref_id) if c.ref_id is not None else None,
            "complaint": complaints.get(c.ref_id) if c.ref_id is not None else None,
            "order": orders.get(c.customer_id),
            "links": links,
            "trigger": trigger_view,
            "now": job.now,
        }
        try:
            rendered = job.catalog.render(job.trigger.email, context)
            msg_id = message_id(c.send_key, sender)
            data = build_message(rendered, sender=sender, to_address=c.email, to_name=customer.name, msg_id=msg_id,
                                 date=date, extra_headers=list_headers(job, links), signer=job.signer)
        except RenderError as exc:
            failures.append(Failure(c, "render_error", str(exc)))
            continue
        except (ValueError, TypeError, IndexError) as exc:
            failures.append(Failure(c, "invalid_message", f"{type(exc).__name__}: {exc}"))
            continue
        claim = claim_for(job, c, rendered.template, msg_id)
        prepared.append(Prepared(c, claim, Envelope(c.send_key, sender.address, c.email, data), rendered.subject))
    return prepared, failures


def claim_for(job: Job, c: Candidate, template: str = "", msg_id: str = "") -> ledger.Claim:
    assert c.email is not None
    return ledger.Claim(c.send_key, job.trigger.name, c.customer_id, c.occurrence, c.stage, template, c.email,
                        msg_id, job.kind.category, c.ref_id)


def list_headers(job: Job, links: Links) -> dict[str, str]:
    """RFC 8058 one-click unsubscribe and RFC 2919 List-Id, on marketing mail only."""
    if job.kind.category != "marketing":
        return {}
    domain = job.sender.domain
    token = links.unsubscribe.rsplit("/", 1)[1]
    mailbox = job.settings.unsubscribe_mailbox or f"unsubscribe@{domain}"
    return {
        "List-Unsubscribe": f"<{links.unsubscribe}>, <mailto:{mailbox}?subject=unsubscribe%20{token}>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        "List-Id": f"<{job.trigger.name}.{domain}>",
    }


# -- dispatch ----------------------------------------------------------------------

_OUTCOME = {
    Result.SENT: SENT,
    Result.BOUNCED: failed("bounced"),
    Result.REJECTED: failed("rejected"),
    Result.DEFERRED: RETRY,
    Result.IN_DOUBT: failed("in_doubt"),
}
_LEDGER: dict[Result, SendStatus | None] = {
    Result.SENT: SendStatus.SENT,
    Result.BOUNCED: SendStatus.FAILED,
    Result.REJECTED: SendStatus.FAILED,
    Result.DEFERRED: None,  # released: the next run tries again
}


def dispatch_prepared(job: Job, prepared: Sequence[Prepared], batch: int = 0) -> Counter[tuple[str, str]]:
    return asyncio.run(_dispatch(job, prepared, *_smtp(job.settings)))


async def _dispatch(job: Job, prepared: Sequence[Prepared], config: SmtpConfig,
                    policy: RetryPolicy) -> Counter[tuple[str, str]]:
    """Claim a window of keys, send them, record them; repeat. At most ``in_flight``
    claims are ever open at once, which bounds what a crash can leave in doubt."""
    engine = get_engine(job.settings.database_url)
    counts: Counter[tuple[str, str]] = Counter()
    gone = await asyncio.to_thread(withdrawn, engine, job.kind, [p.candidate.customer_id for p in prepared])
    for p in prepared:
        if p.candidate.customer_id in gone:
            counts[(p.candidate.stage, skipped(Skip.UNSUBSCRIBED))] += 1
    prepared = [p for p in prepared if p.candidate.customer_id not in gone]
    lease = job.settings.claim_lease

    async def handing_over(key: str) -> None:
        await asyncio.to_thread(ledger.mark_sending, engine, key)

    async with Mailer(config, policy) as mailer:
        mailer.before_data = handing_over
        size = job.settings.in_flight
        for window in (prepared[i : i + size] for i in range(0, len(prepared), size)):
            by_key = {p.claim.send_key: p for p in window}
            won = await asyncio.to_thread(ledger.claim, engine, [p.claim for p in window], job.run_id, job.now, lease)
            for key in by_key.keys() - won:
                counts[(by_key[key].candidate.stage, skipped(Skip.ALREADY_SENT))] += 1
            envelopes = [p.envelope for p in window if p.claim.send_key in won]
            if not envelopes:
                continue
            try:
                deliveries = await mailer.send(envelopes)
            except SmtpUnavailable as exc:
                await asyncio.to_thread(_record, engine, exc.done, by_key, counts)
                attempted = {d.key for d in exc.done}
                await asyncio.to_thread(ledger.release, engine, [k for k in won if k not in attempted])
                raise
            await asyncio.to_thread(_record, engine, deliveries, by_key, counts)
    return counts


def _record(engine, deliveries: Sequence[Delivery], by_key: dict[str, Prepared],
            counts: Counter[tuple[str, str]]) -> None:
    outcomes = [
        ledger.Outcome(d.key, _LEDGER[d.result], reply=d.reply if d.result == Result.SENT else "",
                       error="" if d.result == Result.SENT else d.reply)
        for d in deliveries
        if d.result in _LEDGER
    ]
    ledger.record(engine, outcomes)
    bounced = [by_key[d.key].envelope.recipient for d in deliveries if d.result == Result.BOUNCED]
    ledger.suppress(engine, bounced, SuppressionReason.HARD_BOUNCE, "5xx at RCPT")
    for d in deliveries:
        counts[(by_key[d.key].candidate.stage, _OUTCOME[d.result])] += 1


def _smtp(settings: Settings) -> tuple[SmtpConfig, RetryPolicy]:
    policy = RetryPolicy(settings.smtp_attempts, settings.smtp_backoff_seconds, settings.smtp_backoff_max_seconds)
    return SmtpConfig.from_url(settings.smtp_url), policy


def check_smtp(settings: Settings) -> None:
    """Reach the server before the first batch: if it is down, the run fails before sending."""

    async def probe() -> None:
        async with Mailer(*_smtp(settings)) as mailer:
            await mailer.check()

    asyncio.run(probe())


# -- the run -----------------------------------------------------------------------

RenderStep = Callable[..., tuple[list[Prepared], list[Failure]]]
DispatchStep = Callable[..., Counter[tuple[str, str]]]


def execute(job: Job, render: RenderStep = render_candidates, dispatch: DispatchStep = dispatch_prepared,
            should_stop: Callable[[], bool] = lambda: False, audience: bool = True) -> RunSummary:
    """Run the stages batch by batch: first everyone due, then the sends the policy deferred
    whose moment has come (``audience=False``: only those). ``should_stop`` is asked between
    batches (graceful shutdown)."""
    log = _logger()
    settings = job.settings
    engine = get_engine(settings.database_url)
    summary = RunSummary(job.trigger.name, job.now, job.dry_run)
    log.info("Evaluating %s (%s) as of %s%s", job.trigger.name, job.trigger.kind, job.now.isoformat(),
             " (dry run)" if job.dry_run else "")
    if not job.dry_run:
        expired = ledger.expire(engine, job.trigger.name, job.now)
        if expired:
            summary.add("-", skipped(Skip.EXPIRED), expired)
            log.info("%d deferred send(s) expired (deferred_expires_after)", expired)

    def stream(due=None):  # noqa: ANN001, ANN202
        return stream_candidates(engine, job.trigger, job.kind, job.stages, job.now, settings.batch_size,
                                 settings.default_language, job.policy, due, settings.claim_lease)

    batches = chain(stream() if audience else [], stream(deferred_due(job.trigger, job.now)))
    for number, batch in enumerate(batches, start=1):
        if should_stop():
            log.warning("Stopping before batch %d: shutdown requested; the next run carries on", number)
            summary.interrupted = True
            break
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
        why = ", ".join(f"{reason} {n}" for reason, n in sorted(reasons.items())) or "none"
        if deferred and not job.dry_run:
            expires = job.now + job.trigger.deferred_expires_after if job.trigger.deferred_expires_after else None
            ledger.defer(engine, [(claim_for(job, c), c.not_before, expires) for c in deferred], job.run_id, job.now)
        if not due:
            log.info("Batch %d: %d candidates, none due (skipped: %s)", number, len(batch), why)
            continue
        prepared, failures = render(job, due, batch=number)
        for failure in failures:
            summary.add(failure.candidate.stage, failed(failure.reason))
            log.warning("Customer %s not rendered: %s", failure.candidate.external_id, failure.message)
        summary.templates.update((p.claim.template, p.candidate.stage, p.candidate.language) for p in prepared)
        if job.dry_run:
            for p in prepared:
                summary.add(p.candidate.stage, WOULD_SEND)
                if len(summary.planned) < PLANNED_LINES:
                    c = p.candidate
                    summary.planned.append(PlannedMail(c.external_id, c.stage, c.language, p.claim.template, p.subject))
        else:
            summary.merge(dispatch(job, prepared, batch=number))
        log.info("Batch %d: %d candidates, %d due (skipped: %s), %d not renderable",
                 number, len(batch), len(due), why, len(failures))
    log.info(summary.headline())
    return summary


def _run_name() -> str:
    parameters = flow_run.parameters
    moment = parse_now(parameters.get("now"))
    suffix = " (dry run)" if parameters.get("dry_run") else ""
    return f"{parameters['trigger']} @ {moment:%Y-%m-%d %H:%M} UTC{suffix}"


render_batch = task(render_candidates, name="render", task_run_name="render-batch-{batch}", cache_policy=NO_CACHE)
dispatch_batch = task(dispatch_prepared, name="dispatch", task_run_name="dispatch-batch-{batch}", cache_policy=NO_CACHE)


@flow(name="lifecycle-trigger", flow_run_name=_run_name, validate_parameters=True)
def trigger_flow(trigger: str, now: str | None = None, dry_run: bool = False) -> RunSummary:
    """Evaluate one trigger at ``now`` (ISO 8601; default: the current time) and send."""
    settings = get_settings()
    job = prepare_job(trigger, parse_now(now), settings=settings, dry_run=dry_run, run_id=str(flow_run.id or ""))
    if not dry_run:
        check_smtp(settings)
    summary = execute(job, render=render_batch, dispatch=dispatch_batch)
    publish(summary, settings)
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
    for name, trigger in project.triggers.items():
        if trigger.enabled:
            job = prepare_job(name, moment, settings=settings, project=project, run_id=str(flow_run.id or ""))
            summaries[name] = execute(job, render=render_batch, dispatch=dispatch_batch, audience=False)
    return summaries


def compile_flow(trigger: TriggerBase):
    """The trigger as its own Prefect flow, named after it in the UI."""
    return trigger_flow.with_options(name=trigger.name)


def publish(summary: RunSummary, settings: Settings) -> None:
    """Artifacts for the Prefect UI: the summary (with preview links to `lifecycle web`) and the counts."""
    key = "".join(ch if ch.isalnum() else "-" for ch in summary.trigger.lower())
    secret = settings.secret.get_secret_value()

    def preview(stage: str, language: str) -> str:
        return preview_url(settings.base_url, secret, summary.trigger, stage, language)

    create_markdown_artifact(key=f"{key}-summary", markdown=summary.to_markdown(preview),
                             description=summary.headline())
    create_table_artifact(key=f"{key}-counts", table=summary.table(), description="Counts per stage and outcome")
