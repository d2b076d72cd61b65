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
from collections.abc import Collection
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine, and_, case, exists, func, or_, select
from sqlmodel import Session, col

from flows.analysis.attribution import shifted
from flows.analysis.experiments import Decision, Tally, checkpoint, pick_winner, probability_best
from flows.analysis.lift import Interval, wilson
from flows.run_context import RunContext
from models import Attribution, Engagement, EngagementKind, ExperimentLook, Order, Send, SendStatus
from models.db import insert_for

log = logging.getLogger("lifecycle")

LOOKS = 6
CLICK_MATURITY = timedelta(days=1)
MAILED = (SendStatus.SENT, SendStatus.BOUNCED, SendStatus.COMPLAINED)


def recorded_winner(session: Session, trigger: str, step: str, salt: str) -> str | None:
    look = winning_look(session, trigger, step, salt)
    return look.winner if look is not None else None


def winning_look(session: Session, trigger: str, step: str, salt: str) -> ExperimentLook | None:
    return session.execute(select(ExperimentLook).where(
        col(ExperimentLook.trigger) == trigger, col(ExperimentLook.step) == step, col(ExperimentLook.salt) == salt,
        col(ExperimentLook.winner).is_not(None)).order_by(col(ExperimentLook.look))).scalars().first()


def decide(context: RunContext, logger: logging.Logger | logging.LoggerAdapter[logging.Logger] = log
           ) -> tuple[str | None, str | None]:
    """The step's winner (None: the split as written), and what the rule says: the look it took
    now (a dry run takes it too, and records nothing), or the winning look on record.

    Only the experiment's own mails count (its salt: a new salt is a new experiment), and only
    its arms with a weight: one switched off (weight 0) grows no more, so the rule compares the
    others. A winner the file no longer has with a weight (renamed, removed, switched off) is
    not applied: the split as written goes on, and the run says why.
    """
    plan = context.step
    assert plan is not None and plan.step.experiment is not None
    experiment = plan.step.experiment
    trigger, salt = context.trigger.name, experiment.salt or ""
    names = [v.name for v in experiment.variants if v.weight > 0]
    with Session(context.engine) as session:
        won = winning_look(session, trigger, plan.name, salt)
        winner = won.winner if won is not None else None
        if won is not None and winner is not None:
            if winner in names:
                return winner, f"{winner} won at look {won.look} ({won.decided_at:%Y-%m-%d}): {won.reason}"
            logger.warning("%s, step %s: the experiment's winner %r is no longer one of its variants with a "
                           "weight (%s): the split as written goes on", trigger, plan.name, winner, ", ".join(names))
            return None, f"winner {winner} is no longer a variant with a weight: the split as written"
        if experiment.pick_winner is None or len(names) < 2:
            return None, None
        rule = experiment.pick_winner
        maturity = CLICK_MATURITY if experiment.metric == "clicks" else context.policy.attribution.window
        mature = (col(Send.trigger) == trigger, col(Send.step) == plan.name, col(Send.experiment) == salt,
                  col(Send.variant).in_(names), col(Send.status).in_(MAILED),
                  col(Send.evaluated_at) <= context.now - maturity)
        sizes = dict(session.execute(select(col(Send.variant), func.count()).where(*mature)
                                     .group_by(col(Send.variant))).tuples().all())
        reached = checkpoint(min(sizes.get(name, 0) for name in names), min_per_variant=rule.min_per_variant,
                             looks=LOOKS)
        if reached is None:
            return None, None
        look = reached.bit_length() - rule.min_per_variant.bit_length() + 1
        if session.get(ExperimentLook, (trigger, plan.name, salt, look)) is not None:
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
        if context.dry_run:
            return decision.winner, said
        session.rollback()  # the reads' transaction ends: the write below starts its own
    with context.engine.begin() as connection:
        recorded = connection.execute(insert_for(context.engine)(ExperimentLook).values(
            trigger=trigger, step=plan.name, salt=salt, look=look, checkpoint=reached, winner=decision.winner,
            reason=decision.reason, figures=figures(decision), decided_at=context.now,
        ).on_conflict_do_nothing().returning(col(ExperimentLook.look))).first()
    if recorded is None:  # a run racing this one took the look first: its decision holds
        with Session(context.engine) as session:
            return recorded_winner(session, trigger, plan.name, salt), None
    return decision.winner, said


def figures(decision: Decision) -> str:
    """The decision as JSON, for the ledger and the report (intervals as [low, high])."""
    return json.dumps(asdict(decision), default=list, sort_keys=True)


@dataclass(frozen=True)
class ArmResult:
    """One arm of a step's experiment over a period: its mails, and what they earned."""

    variant: str  # "" for the held-out arm
    recipients: int
    clicks: int  # recipients a person clicked for (never for the held out: they got nothing)
    conversions: int  # recipients with an order attributed to the mail, or placed within the window held out
    click_rate: float
    click_interval: Interval
    click_p_best: float | None
    conversion_rate: float
    conversion_interval: Interval
    conversion_p_best: float | None


@dataclass(frozen=True)
class ExperimentResult:
    trigger: str
    step: str
    salt: str  # which experiment of the step: a new salt is a new one
    arms: tuple[ArmResult, ...]
    decision: str | None  # the last look's reason, or None before any
    winner: str | None

    def to_json(self) -> dict[str, object]:
        return {"trigger": self.trigger, "step": self.step, "salt": self.salt, "winner": self.winner,
                "decision": self.decision,
                "arms": [asdict(arm) | {"variant": arm.variant or "held_out"} for arm in self.arms]}


def results(engine: Engine, *, since: datetime, until: datetime, now: datetime, window: timedelta,
            triggers: Collection[str] | None = None) -> list[ExperimentResult]:
    """Each experiment's arms over the period's mails (``evaluated_at`` in it, by ``now``): the
    variants by their recorded arm, and the held out of the same step as an arm of its own.
    P(best) compares the variants only (the held out get no mail to click). A conversion of a
    variant is an attributed order; of the held out, an order within ``window`` of the moment
    the mail would have gone (as the holdout lift counts it)."""
    period = (col(Send.evaluated_at) >= since, col(Send.evaluated_at) < until, col(Send.evaluated_at) <= now)
    scope = (col(Send.trigger).in_(list(triggers)),) if triggers else ()
    with Session(engine) as session:
        experiments = session.execute(select(col(Send.trigger), col(Send.step), col(Send.experiment)).where(
            col(Send.variant) != "", *period, *scope).distinct()
            .order_by(col(Send.trigger), col(Send.step), col(Send.experiment))).all()
        found = []
        for trigger, step, salt in experiments:
            clicked = exists().where(col(Engagement.send_id) == col(Send.id),
                                     col(Engagement.kind) == EngagementKind.CLICK, col(Engagement.machine) == "",
                                     col(Engagement.at) <= now)
            attributed = exists().where(col(Attribution.send_id) == col(Send.id), col(Attribution.placed_at) <= now)
            ordered = exists().where(col(Order.customer_id) == col(Send.customer_id),
                                     col(Order.placed_at) > col(Send.evaluated_at),
                                     col(Order.placed_at) <= shifted(col(Send.evaluated_at), window,
                                                                     engine.dialect.name),
                                     col(Order.placed_at) <= now)
            held = col(Send.status) == SendStatus.HELD_OUT
            converted = case((held, ordered), else_=attributed)
            rows = session.execute(
                select(col(Send.variant), func.count(), func.sum(case((clicked, 1), else_=0)),
                       func.sum(case((converted, 1), else_=0)))
                .where(col(Send.trigger) == trigger, col(Send.step) == step, *period,
                       or_(and_(col(Send.experiment) == salt, col(Send.status).in_(MAILED)), held))
                .group_by(col(Send.variant)).order_by(col(Send.variant))).all()
            counts = [(variant, int(n), int(k or 0), int(c or 0)) for variant, n, k, c in rows]
            variants = [row for row in counts if row[0]]
            click_best = dict(zip([v for v, *_ in variants], probability_best([(k, n) for _, n, k, _ in variants]),
                                  strict=True)) if len(variants) > 1 else {}
            conversion_best = dict(zip([v for v, *_ in variants],
                                       probability_best([(c, n) for _, n, _, c in variants]), strict=True)
                                   ) if len(variants) > 1 else {}
            arms = tuple(ArmResult(variant, n, k, c, k / n if n else 0.0, wilson(k, n), click_best.get(variant),
                                   c / n if n else 0.0, wilson(c, n), conversion_best.get(variant))
                         for variant, n, k, c in [*variants, *(row for row in counts if not row[0])])
            last = session.execute(select(ExperimentLook).where(
                col(ExperimentLook.trigger) == trigger, col(ExperimentLook.step) == step,
                col(ExperimentLook.salt) == salt,
                col(ExperimentLook.decided_at) <= now).order_by(col(ExperimentLook.look).desc())).scalars().first()
            found.append(ExperimentResult(trigger, step, salt, arms, last.reason if last else None,
                                          last.winner if last else None))
    return found
