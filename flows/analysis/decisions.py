"""What each trigger would decide for one customer now: support's "why did I not get it?".

A skip leaves no row in the ledger (a run reconsiders everyone each time), so the timeline
cannot show it. This asks every enabled trigger's audience, and each journey step's, for
this one customer at ``now``, through the very query and rules a run uses (consent,
suppressions, re-entry, the sending policy, a step's conditions and exits), and writes
nothing: the reasons a run would give, with nobody mailed.
"""

from dataclasses import dataclass
from datetime import datetime

from flows.audience.query import stream_candidates
from flows.outcomes import Outcome
from flows.run_context import RunContext


@dataclass(frozen=True)
class Decision:
    trigger: str
    step: str  # "" for a trigger's one mail
    outcome: Outcome  # would_send, or what holds it back (skipped:…, deferred:…)
    not_before: datetime | None = None  # a deferral's moment

    def to_json(self) -> dict[str, object]:
        return {"trigger": self.trigger, "step": self.step, "outcome": self.outcome.value,
                "not_before": self.not_before.isoformat() if self.not_before else None}


def decisions_now(contexts: list[RunContext], customer_id: int) -> list[Decision]:
    """For each trigger (each journey step) the customer is due for at the contexts' moment:
    would it mail them, and if not, why. Triggers they are not due for say nothing."""
    found = []
    for context in contexts:
        for part in context.passes():
            step = part.step.name if part.step is not None else ""
            for batch in stream_candidates(part.engine, part.trigger, part.kind, part.stages, part.now, 100,
                                           part.settings.default_language, part.policy,
                                           languages=part.catalog.languages_for(part.email), step=part.step,
                                           customer=customer_id):
                for candidate in batch:
                    outcome = candidate.skip or Outcome.WOULD_SEND
                    found.append(Decision(part.trigger.name, step, outcome, candidate.not_before))
    return found
