"""Variants: a deterministic, weighted, salted draw, independent of the holdout's."""

import hashlib
import math
import re

import numpy as np
import pytest

from flows.audience import holdout
from flows.audience.variants import assign, draw, winner_takes_all

IDS = [f"c-{n}" for n in range(100_000)]
THREE = [("A", 0.5), ("B", 0.3), ("C", 0.2)]


def shares(customers: list[str], weights=THREE, trigger="welcome", step="day-1", salt="spring") -> dict[str, float]:
    names = [assign(weights, trigger, step, salt, c) for c in customers]
    return {name: names.count(name) / len(names) for name, _ in weights}


def close(share: float, weight: float, n: int) -> bool:
    """Within five binomial standard deviations: a chance of 6e-7 each, so a miss is a bug, not chance."""
    return abs(share - weight) < 5 * math.sqrt(weight * (1 - weight) / n)


def test_the_variant_is_fixed_by_trigger_step_salt_and_customer() -> None:
    assert assign(THREE, "welcome", "day-1", "spring", "c-1") == assign(THREE, "welcome", "day-1", "spring", "c-1")
    assert draw("welcome", "day-1", "spring", "c-1") == int.from_bytes(
        hashlib.sha256(b"variant\x1fwelcome\x1fday-1\x1fspring\x1fc-1").digest()[:8], "big") / 2**64


def test_the_shares_match_the_weights_over_100_000_customers() -> None:
    measured = shares(IDS)
    assert all(close(measured[name], weight, len(IDS)) for name, weight in THREE), measured


def test_weights_are_normalised_so_two_to_one_is_two_thirds_and_one_third() -> None:
    halves = [("A", 2.0), ("B", 1.0), ("C", 1.0)]
    quarters = [("A", 0.5), ("B", 0.25), ("C", 0.25)]
    assert all(assign(halves, "t", "s", "x", c) == assign(quarters, "t", "s", "x", c) for c in IDS[:20_000])


@pytest.mark.parametrize("change", [{"salt": "autumn"}, {"step": "day-2"}, {"trigger": "winback"}])
def test_a_new_salt_step_or_trigger_deals_the_variants_anew(change: dict[str, str]) -> None:
    weights = [("A", 1.0), ("B", 1.0)]
    here = {"trigger": "welcome", "step": "day-1", "salt": "spring"}
    there = here | change
    kept = sum(assign(weights, **here, customer=c) == assign(weights, **there, customer=c) for c in IDS)
    # Independent draws keep a customer's variant with chance ½·½ + ½·½ = ½; the same draw, always.
    assert close(kept / len(IDS), 0.5, len(IDS)), kept


@pytest.mark.parametrize("salt", ["spring", "welcome"])  # "welcome": the holdout's default salt, the trigger's name
def test_the_variants_split_held_out_and_treated_customers_alike(salt: str) -> None:
    """The holdout is decided first; the variant draw must not lean on it."""
    out = [c for c in IDS if holdout.held_out(0.2, "welcome", salt, c)]
    treated = [c for c in IDS if not holdout.held_out(0.2, "welcome", salt, c)]
    assert close(len(out) / len(IDS), 0.2, len(IDS))
    for group in (out, treated):
        measured = shares(group, salt=salt)
        assert all(close(measured[name], weight, len(group)) for name, weight in THREE), measured
    # And the two uniforms themselves are uncorrelated: r has standard deviation 1/√n when they are independent.
    both = np.array([(holdout.draw("welcome", salt, c), draw("welcome", "day-1", salt, c)) for c in IDS])
    assert abs(np.corrcoef(both.T)[0, 1]) < 5 / math.sqrt(len(IDS))


@pytest.mark.parametrize(("weights", "message"), [
    ([("A", 0.0), ("B", 0.0)], "the variants' weights add up to nothing: give at least one a positive weight"),
    ([("A", -1.0), ("B", 2.0)], "variant 'A': a weight must be a number from 0 up, got -1.0"),
    ([("A", 1.0), ("B", math.nan)], "variant 'B': a weight must be a number from 0 up, got nan"),
    ([("A", math.inf), ("B", 1.0)], "variant 'A': a weight must be a number from 0 up, got inf"),
    ([("A", 1.0), ("A", 1.0)], "variant 'A' is listed twice"),
    ([], "an experiment needs at least one variant"),
])
def test_bad_weights_are_refused_with_the_variant_named(weights, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        assign(weights, "welcome", "day-1", "spring", "c-1")


@pytest.mark.parametrize("off", [0, 1, 2])
def test_a_variant_weighted_0_is_switched_off_and_the_others_share_its_traffic(off: int) -> None:
    weights = [(name, 0.0 if index == off else weight) for index, (name, weight) in enumerate(THREE)]
    given = {assign(weights, "welcome", "day-1", "spring", c) for c in IDS[:5000]}
    assert given == {name for index, (name, _) in enumerate(THREE) if index != off}


def test_once_a_winner_is_named_every_later_customer_gets_it() -> None:
    assert all(winner_takes_all(None, THREE, "welcome", "day-1", "spring", c)
               == assign(THREE, "welcome", "day-1", "spring", c) for c in IDS[:2000])
    assert {winner_takes_all("C", THREE, "welcome", "day-1", "spring", c) for c in IDS[:2000]} == {"C"}
    with pytest.raises(ValueError, match="the winner 'D' is not one of the variants: A, B, C"):
        winner_takes_all("D", THREE, "welcome", "day-1", "spring", "c-1")
