"""One batch of due recipients: render → compose → claim → SMTP → ledger.

Everything here runs without Prefect, in the flow's own process or in a sender
process (``flows.send.senders``), so a large run can use every core. ``pipeline`` wires
batches into a run and wraps these steps as Prefect tasks.
"""

import asyncio
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session

from flows.feedback import bounces
from flows.send import claims as ledger
from flows.audience.query import Candidate, Skip, withdrawn
from flows.message.compose import Sender, build_message, message_id
from flows.content.context import (
    CustomerView,
    Links,
    TriggerView,
    load_carts,
    load_complaints,
    load_latest_orders,
)
from flows.send.smtp import (
    BreakerPolicy,
    Delivery,
    Envelope,
    Mailer,
    Result,
    RetryPolicy,
    SmtpConfig,
    SmtpUnavailable,
)
from flows.message.dkim import DkimSigner
from flows.kinds import KINDS
from flows.kinds.base import Kind
from flows.content.links import confirm_url, preferences_url, unsubscribe_url, verp_address
from flows.content.render import RenderError, TemplateCatalog
from flows.summary import (
    BOUNCED,
    IN_DOUBT,
    REJECTED,
    RETRY,
    SENT,
    SOFT_BOUNCED,
    WOULD_SEND,
    PlannedMail,
    failed,
    skipped,
)
from flows.settings import Settings
from flows.signing_secret import resolved
from flows.spec.common import TriggerBase
from flows.spec.policy import Policy
from flows.spec.project import Project, load_project
from flows.spec.stages import StageRules
from models import FeedbackKind, SendStatus
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
    settings = resolved(settings)  # once per run: the senders get it with the job
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
    sender, secret, date = job.sender, settings.signing_secret, utcnow()
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
            confirm=_confirm_url(job, secret, c) if job.kind.reference == "consent" else None,
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
            msg_id = message_id(c.send_key, sender, secret)
            data = build_message(rendered, sender=sender, to_address=c.email, to_name=customer.name, msg_id=msg_id,
                                 date=date, extra_headers=list_headers(job, links), signer=job.signer)
        except RenderError as exc:
            failures.append(Failure(c, "render_error", str(exc)))
            continue
        except (ValueError, TypeError, IndexError) as exc:
            failures.append(Failure(c, "invalid_message", f"{type(exc).__name__}: {exc}"))
            continue
        claim = claim_for(job, c, rendered.template, msg_id)
        return_path = verp_address(settings.bounce_address or f"bounces@{sender.domain}", secret, c.send_key)
        prepared.append(Prepared(c, claim, Envelope(c.send_key, return_path, c.email, data), rendered.subject))
    return prepared, failures


def _confirm_url(job: Job, secret: str, c: Candidate) -> str:
    """The link confirms this mail's request (its occurrence) until the request is too old to ask about."""
    from flows.consent import requested_at

    try:
        asked = requested_at(c.occurrence)
    except ValueError:
        asked = job.now  # a preview: no request behind it
    return confirm_url(job.settings.base_url, secret, c.external_id, c.occurrence, asked + job.trigger.max_age,
                       c.email or "")


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
    Result.DEFERRED: RETRY,
    Result.IN_DOUBT: IN_DOUBT,
}
# A permanent refusal (5xx at RCPT, MAIL or DATA) is counted by what it says, not where it came.
_REFUSED = {
    FeedbackKind.HARD_BOUNCE: BOUNCED,
    FeedbackKind.SOFT_BOUNCE: SOFT_BOUNCED,
    FeedbackKind.MESSAGE_FAILURE: REJECTED,
}
_LEDGER: dict[Result, SendStatus | None] = {
    Result.SENT: SendStatus.SENT,
    Result.BOUNCED: SendStatus.FAILED,
    Result.REJECTED: SendStatus.FAILED,
    Result.DEFERRED: None,  # released: the next run tries again
}


def dispatch_prepared(job: Job, prepared: Sequence[Prepared], batch: int = 0) -> Counter[tuple[str, str]]:
    return asyncio.run(_dispatch(job, prepared, *_smtp(job.settings)))


async def _dispatch(job: Job, prepared: Sequence[Prepared], config: SmtpConfig, policy: RetryPolicy,
                    breaker: BreakerPolicy) -> Counter[tuple[str, str]]:
    """Claim a window of keys, mark it handed over, send it, record it; repeat.

    At most ``in_flight`` keys are ever ``sending`` at once, which bounds what a crash
    can leave in doubt; besides those, the refusals the breaker holds undecided (at most
    its streak or its sample's share). Marking a whole window in one statement, not each
    message, keeps the ledger off the hot path. If the relay fails the batch (unreachable,
    or the breaker trips), every claim handed over but not decided is released: the next
    run sends it.
    """
    engine = get_engine(job.settings.database_url)
    counts: Counter[tuple[str, str]] = Counter()
    gone = await asyncio.to_thread(withdrawn, engine, job.kind, [p.candidate.customer_id for p in prepared])
    for p in prepared:
        if p.candidate.customer_id in gone:
            counts[(p.candidate.stage, skipped(Skip.UNSUBSCRIBED))] += 1
    prepared = [p for p in prepared if p.candidate.customer_id not in gone]
    lease, rule = job.settings.claim_lease, job.settings.soft_bounce_rule
    by_key = {p.claim.send_key: p for p in prepared}
    undecided: set[str] = set()  # handed over (``sending``) and not yet recorded

    async def record(deliveries: Sequence[Delivery]) -> None:
        await asyncio.to_thread(_record, engine, deliveries, by_key, counts, rule)
        undecided.difference_update(d.key for d in deliveries)

    async with Mailer(config, policy, breaker, recipients=len(prepared)) as mailer:
        size = job.settings.in_flight
        try:
            for window in (prepared[i : i + size] for i in range(0, len(prepared), size)):
                keys = [p.claim.send_key for p in window]
                won = await asyncio.to_thread(ledger.claim, engine, [p.claim for p in window], job.run_id, job.now,
                                              lease)
                handing = await asyncio.to_thread(ledger.mark_sending, engine, won, job.run_id)
                # Not won, or (after a stall longer than the lease) taken over by another run since.
                for key in set(keys) - handing:
                    counts[(by_key[key].candidate.stage, skipped(Skip.ALREADY_SENT))] += 1
                envelopes = [p.envelope for p in window if p.claim.send_key in handing]
                if not envelopes:
                    continue
                undecided.update(handing)
                await record(await mailer.send(envelopes))
            await record(mailer.settle())
        except SmtpUnavailable as exc:
            await record(exc.done)
            # The rest never reached DATA, or the breaker refused to blame their recipients.
            await asyncio.to_thread(ledger.release, engine, sorted(undecided))
            raise
    return counts


def _record(engine: Engine, deliveries: Sequence[Delivery], by_key: dict[str, Prepared],
            counts: Counter[tuple[str, str]], rule: bounces.SoftBounceRule) -> None:
    """The ledger first, then each refusal as a bounce report: only the address's own
    fault suppresses it (hard at once, soft by ``rule``)."""
    outcomes = [
        ledger.Outcome(d.key, _LEDGER[d.result], reply=d.reply if d.result == Result.SENT else "",
                       error="" if d.result == Result.SENT else d.reply)
        for d in deliveries
        if d.result in _LEDGER
    ]
    ledger.record(engine, outcomes)
    now = utcnow()
    reports = [
        bounces.Report(report_id=f"smtp:{d.key}", email=by_key[d.key].envelope.recipient, kind=d.verdict.kind,
                       source="smtp", occurred_at=now, status=d.verdict.status, diagnostic=d.reply, send_key=d.key)
        for d in deliveries
        if d.verdict is not None
    ]
    bounces.record(engine, reports, rule, update_sends=False)
    for d in deliveries:
        outcome = _REFUSED[d.verdict.kind] if d.verdict is not None else _OUTCOME[d.result]
        counts[(by_key[d.key].candidate.stage, outcome)] += 1


@dataclass
class BatchOutcome:
    """What one batch did; small enough to return from a sender process."""

    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)
    templates: set[tuple[str, str, str]] = field(default_factory=set)  # (template file, stage, language)
    planned: list[PlannedMail] = field(default_factory=list)  # dry runs: who would get what


def deliver(job: Job, candidates: Sequence[Candidate], batch: int = 0, render: Any = render_candidates,
            dispatch: Any = dispatch_prepared) -> BatchOutcome:
    """Render the batch, then send it (a dry run only plans it). ``render`` and ``dispatch``
    may be Prefect tasks wrapping the plain functions."""
    prepared, failures = render(job, candidates, batch=batch)
    outcome = BatchOutcome(failures=failures)
    outcome.counts.update((f.candidate.stage, failed(f.reason)) for f in failures)
    outcome.templates.update((p.claim.template, p.candidate.stage, p.candidate.language) for p in prepared)
    if job.dry_run:
        outcome.counts.update((p.candidate.stage, WOULD_SEND) for p in prepared)
        outcome.planned = [PlannedMail(p.candidate.external_id, p.candidate.stage, p.candidate.language,
                                       p.claim.template, p.subject) for p in prepared[:PLANNED_LINES]]
    else:
        outcome.counts.update(dispatch(job, prepared, batch=batch))
    return outcome


def _smtp(settings: Settings) -> tuple[SmtpConfig, RetryPolicy, BreakerPolicy]:
    policy = RetryPolicy(settings.smtp_attempts, settings.smtp_backoff_seconds, settings.smtp_backoff_max_seconds)
    breaker = BreakerPolicy(settings.breaker_consecutive, settings.breaker_sample, settings.breaker_share,
                            settings.breaker_bounce_share)
    return SmtpConfig.from_url(settings.smtp_url), policy, breaker


def check_smtp(settings: Settings) -> None:
    """Reach the server (and log in) before the first batch: if it is down or refuses our
    login, the run fails before sending."""

    async def probe() -> None:
        async with Mailer(*_smtp(settings)) as mailer:
            await mailer.check()

    asyncio.run(probe())
