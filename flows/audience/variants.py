"""Which variant of an experiment's step a customer gets: a deterministic, weighted draw.

The draw is built like the holdout's (``flows.audience.holdout.draw``): the first 64 bits of
SHA-256, as a fraction of 2⁶⁴, here over a ``variant`` tag, the trigger, the step, the salt and
the customer, placed on the variants' cumulative weights. The same customer gets the same
variant in every run and on every machine; a new salt deals the variants anew.

The holdout is decided first, and only the treated are mailed a variant. The tag and the step
make the hashed text differ from the holdout's for every customer, and SHA-256 of distinct texts
gives independent uniforms, so the variant draw is independent of the holdout draw: the variants
split the treated (and the held-out, had they been mailed) by the weights, whatever the share
held out and even when both state the same salt.
"""

import hashlib
import math
from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate

_SCALE = float(2**64)


def draw(trigger: str, step: str, salt: str, customer: str) -> float:
    """A number in [0, 1), uniform over customers, fixed for (trigger, step, salt, customer)."""
    digest = hashlib.sha256(f"variant\x1f{trigger}\x1f{step}\x1f{salt}\x1f{customer}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE


def assign(weights: Sequence[tuple[str, float]], trigger: str, step: str, salt: str, customer: str) -> str:
    """The customer's variant: variant i for draws in its slice of the cumulative weights.

    Weights need not sum to 1 (``[("A", 2), ("B", 1)]`` is two thirds and one third). A weight
    of 0 switches a variant off (nobody new gets it; the journey file allows it, so that a
    marketer can stop an arm without deleting its history); together they must be positive.
    """
    names, cumulative = _slices(weights)
    point = draw(trigger, step, salt, customer) * cumulative[-1]
    # min(): a draw a rounding error below the total must still land on the last variant.
    return names[min(bisect_right(cumulative, point), len(names) - 1)]


def winner_takes_all(winner: str | None, weights: Sequence[tuple[str, float]], trigger: str, step: str,
                     salt: str, customer: str) -> str:
    """The winner, once the experiment has one (``flows.analysis.experiments.pick_winner``); the draw until then.

    Only later assignments change: a customer already mailed a variant keeps it in the ledger.
    """
    if winner is None:
        return assign(weights, trigger, step, salt, customer)
    names, _ = _slices(weights)
    if winner not in names:
        raise ValueError(f"the winner {winner!r} is not one of the variants: {', '.join(names)}")
    return winner


def _slices(weights: Sequence[tuple[str, float]]) -> tuple[list[str], list[float]]:
    if not weights:
        raise ValueError("an experiment needs at least one variant")
    names = [name for name, _ in weights]
    for name, weight in weights:
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"variant {name!r}: a weight must be a number from 0 up, got {weight}")
        if names.count(name) > 1:
            raise ValueError(f"variant {name!r} is listed twice")
    cumulative = list(accumulate(weight for _, weight in weights))
    if cumulative[-1] <= 0:
        raise ValueError("the variants' weights add up to nothing: give at least one a positive weight")
    return names, cumulative
