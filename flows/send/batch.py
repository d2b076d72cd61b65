"""One batch of due recipients: render and compose (``message.prepare``), then claim,
send and record, exactly once.

Everything here runs without Prefect, in the run's own process or in a sender process
(``send.senders``), so a large run uses every core. ``flows.run`` wires batches into a
run; the Prefect flows wrap these steps as tasks.
"""

import asyncio
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine

from flows.audience.query import Candidate
from flows.consent import withdrawn
from flows.feedback import bounces
from flows.message.prepare import Failure, Prepared, render_candidates
from flows.outcomes import Outcome
from flows.run_context import RunContext
from flows.send import claims
from flows.send.probe import smtp_policies
from flows.send.smtp import BreakerPolicy, Delivery, Mailer, RetryPolicy, SmtpConfig, SmtpUnavailable
from flows.summary import PlannedMail
from models.types import utcnow

PLANNED_LINES = 50
Counts = Counter[tuple[str, Outcome]]  # (stage, outcome) → mails


def dispatch_prepared(context: RunContext, prepared: Sequence[Prepared], batch: int = 0) -> Counts:
    return asyncio.run(_dispatch(context, prepared, *smtp_policies(context.settings)))


async def _dispatch(context: RunContext, prepared: Sequence[Prepared], config: SmtpConfig, policy: RetryPolicy,
                    breaker: BreakerPolicy) -> Counts:
    """Claim a window of keys straight into ``sending`` (``claims.hand_over``), send it,
    record it; repeat.

    At most ``in_flight`` keys are ever ``sending`` at once, which bounds what a crash
    can leave in doubt; besides those, the refusals the breaker holds undecided (at most
    its streak or its sample's share). A window costs the ledger two statements, its claim
    and its outcomes, and each row two writes, which keeps the ledger off the hot path. If
    the relay fails the batch (unreachable, or the breaker trips), every claim handed over
    but not decided is released: the next run sends it.
    """
    engine, settings = context.engine, context.settings
    counts: Counts = Counter()
    gone = await asyncio.to_thread(withdrawn, engine, context.kind, [p.candidate.customer_id for p in prepared])
    for p in prepared:
        if p.candidate.customer_id in gone:
            counts[(p.candidate.stage, Outcome.UNSUBSCRIBED)] += 1
    prepared = [p for p in prepared if p.candidate.customer_id not in gone]
    lease, rule = settings.claim_lease, settings.soft_bounce_rule
    by_key = {p.claim.send_key: p for p in prepared}
    undecided: set[str] = set()  # handed over (``sending``) and not yet recorded

    async def record(deliveries: Sequence[Delivery]) -> None:
        await asyncio.to_thread(_record, engine, deliveries, by_key, counts, rule)
        undecided.difference_update(d.key for d in deliveries)

    async with Mailer(config, policy, breaker, recipients=len(prepared)) as mailer:
        size = settings.in_flight
        try:
            for window in (prepared[i : i + size] for i in range(0, len(prepared), size)):
                keys = [p.claim.send_key for p in window]
                handing = await asyncio.to_thread(claims.hand_over, engine, [p.claim for p in window],
                                                  context.run_id, context.now, lease)
                for key in set(keys) - handing:  # another run's, or already decided
                    counts[(by_key[key].candidate.stage, Outcome.ALREADY_SENT)] += 1
                envelopes = [p.envelope for p in window if p.claim.send_key in handing]
                if not envelopes:
                    continue
                undecided.update(handing)
                await record(await mailer.send(envelopes))
            await record(mailer.settle())
        except SmtpUnavailable as exc:
            await record(exc.done)
            # The rest never reached DATA, or the breaker refused to blame their recipients.
            await asyncio.to_thread(claims.release, engine, sorted(undecided))
            raise
    return counts


def _record(engine: Engine, deliveries: Sequence[Delivery], by_key: dict[str, Prepared], counts: Counts,
            rule: bounces.SoftBounceRule) -> None:
    """The ledger first, then each refusal as a bounce report: only the address's own
    fault suppresses it (hard at once, soft by ``rule``). An in-doubt send is not recorded:
    it stays ``sending`` for an operator."""
    decisions = [
        claims.Decision(d.key, d.result.ledger_status, reply=d.reply if d.result is Outcome.SENT else "",
                        error="" if d.result is Outcome.SENT else d.reply)
        for d in deliveries
        if d.result is not Outcome.IN_DOUBT
    ]
    claims.record(engine, decisions)
    now = utcnow()
    reports = [
        bounces.Report(report_id=f"smtp:{d.key}", email=by_key[d.key].envelope.recipient, kind=d.verdict.kind,
                       source="smtp", occurred_at=now, status=d.verdict.status, diagnostic=d.reply, send_key=d.key)
        for d in deliveries
        if d.verdict is not None
    ]
    bounces.record(engine, reports, rule, update_sends=False)
    for d in deliveries:
        counts[(by_key[d.key].candidate.stage, d.result)] += 1


@dataclass
class BatchOutcome:
    """What one batch did; small enough to return from a sender process."""

    counts: Counts = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)
    # (template file, stage, language, journey step, variant): what was sent, for its preview link
    templates: set[tuple[str, str, str, str, str]] = field(default_factory=set)
    planned: list[PlannedMail] = field(default_factory=list)  # dry runs: who would get what


RenderStep = Callable[..., Any]  # render_candidates, or a Prefect task around it
DispatchStep = Callable[..., Any]  # dispatch_prepared, or a Prefect task around it


Rendered = tuple[list[Prepared], list[Failure]]  # a batch made into mail, and who could not be


def deliver(context: RunContext, candidates: Sequence[Candidate], batch: int = 0,
            render: RenderStep = render_candidates, dispatch: DispatchStep = dispatch_prepared) -> BatchOutcome:
    """Render the batch, then send it (a dry run only plans it)."""
    prepared, failures = render(context, candidates, batch=batch)
    return send_rendered(context, prepared, failures, batch, dispatch)


def send_rendered(context: RunContext, prepared: list[Prepared], failures: list[Failure], batch: int = 0,
                  dispatch: DispatchStep = dispatch_prepared) -> BatchOutcome:
    """A rendered batch sent (a dry run only plans it), and what it did."""
    outcome = BatchOutcome(failures=failures)
    outcome.counts.update((f.candidate.stage, f.outcome) for f in failures)
    outcome.templates.update((p.claim.template, p.candidate.stage, p.candidate.language, p.claim.step,
                              p.claim.variant) for p in prepared)
    if context.dry_run:
        outcome.counts.update((p.candidate.stage, Outcome.WOULD_SEND) for p in prepared)
        outcome.planned = [PlannedMail(p.candidate.external_id, p.candidate.stage, p.candidate.language,
                                       p.claim.template, p.subject) for p in prepared[:PLANNED_LINES]]
    else:
        outcome.counts.update(dispatch(context, prepared, batch=batch))
    return outcome
