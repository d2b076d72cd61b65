"""The winner rule at work: each look it takes at a journey step's experiment, from the
ledger and what the mails earned, recorded with its figures (``experiment_looks``).

A look is taken as the step's pass begins, once every arm has reached the next checkpoint
(``experiments.checkpoint``: 500, 1,000, 2,000… mature recipients each), and only once per
checkpoint: the rule's threshold budgets for exactly those looks. A recipient is mature
when their mail has had time to earn its outcome: a day for a click, the attribution
window for an order. Each arm's first ``checkpoint`` mature recipients (in send order) are
read, so a look never sees more of one arm than of another. Once a look names a winner,
every later mail of the step is the winner's (``variants.winner_takes_all``); without
``pick_winner``, the split stays as written and no look is taken.
"""

import json
import logging
from dataclasses import asdict
from datetime import timedelta

from sqlalchemy import case, exists, func, select
from sqlmodel import Session, col

from flows.analysis.experiments import Decision, Tally, checkpoint, pick_winner
from flows.run_context import RunContext
from models import Attribution, Engagement, EngagementKind, ExperimentLook, Send, SendStatus

log = logging.getLogger("lifecycle")

LOOKS = 6
CLICK_MATURITY = timedelta(days=1)
MAILED = (SendStatus.SENT, SendStatus.BOUNCED, SendStatus.COMPLAINED)


def recorded_winner(session: Session, trigger: str, step: str, salt: str) -> str | None:
    return session.execute(select(col(ExperimentLook.winner)).where(
        col(ExperimentLook.trigger) == trigger, col(ExperimentLook.step) == step, col(ExperimentLook.salt) == salt,
        col(ExperimentLook.winner).is_not(None)).order_by(col(ExperimentLook.look))).scalars().first()


def decide(context: RunContext, logger: logging.Logger | logging.LoggerAdapter[logging.Logger] = log
           ) -> tuple[str | None, str | None]:
    """The step's winner (None: the split as written), and what the rule said now if it took
    a look (a dry run takes it too, and records nothing)."""
    plan = context.step
    assert plan is not None and plan.step.experiment is not None
    experiment = plan.step.experiment
    trigger, salt = context.trigger.name, experiment.salt or ""
    with Session(context.engine) as session:
        winner = recorded_winner(session, trigger, plan.name, salt)
        if winner is not None or experiment.pick_winner is None:
            return winner, None
        rule = experiment.pick_winner
        maturity = CLICK_MATURITY if experiment.metric == "clicks" else context.policy.attribution.window
        names = [v.name for v in experiment.variants]
        mature = (col(Send.trigger) == trigger, col(Send.step) == plan.name, col(Send.variant).in_(names),
                  col(Send.status).in_(MAILED), col(Send.evaluated_at) <= context.now - maturity)
        sizes = dict(session.execute(select(col(Send.variant), func.count()).where(*mature)
                                     .group_by(col(Send.variant))).tuples().all())
        reached = checkpoint(min(sizes.get(name, 0) for name in names), min_per_variant=rule.min_per_variant,
                             looks=LOOKS)
        if reached is None:
            return None, None
        look = reached.bit_length() - rule.min_per_variant.bit_length() + 1
        taken = session.get(ExperimentLook, (trigger, plan.name, salt, look))
        if taken is not None:
            return None, None
        ranked = select(col(Send.id).label("id"), col(Send.variant).label("variant"),
                        func.row_number().over(partition_by=col(Send.variant), order_by=col(Send.id)).label("rank")
                        ).where(*mature).subquery()
        if experiment.metric == "clicks":
            success = exists().where(col(Engagement.send_id) == ranked.c.id,
                                     col(Engagement.kind) == EngagementKind.CLICK, col(Engagement.machine) == "",
                                     col(Engagement.at) <= context.now)
        else:
            success = exists().where(col(Attribution.send_id) == ranked.c.id,
                                     col(Attribution.placed_at) <= context.now)
        counts = {variant: (n, k or 0) for variant, n, k in session.execute(
            select(ranked.c.variant, func.count(), func.sum(case((success, 1), else_=0)))
            .where(ranked.c.rank <= reached).group_by(ranked.c.variant)).tuples()}
        decision = pick_winner([Tally(name, counts[name][1], counts[name][0]) for name in names],
                               min_per_variant=rule.min_per_variant, probability=rule.probability, looks=LOOKS)
        said = decision.summary()
        logger.info("%s, step %s: look %d of the winner rule: %s", trigger, plan.name, look, said)
        if not context.dry_run:
            session.add(ExperimentLook(trigger=trigger, step=plan.name, salt=salt, look=look, checkpoint=reached,
                                       winner=decision.winner, reason=decision.reason, figures=figures(decision),
                                       decided_at=context.now))
            session.commit()
        return decision.winner, said


def figures(decision: Decision) -> str:
    """The decision as JSON, for the ledger and the report (intervals as [low, high])."""
    return json.dumps(asdict(decision), default=list, sort_keys=True)
