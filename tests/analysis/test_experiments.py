"""P(best) against exact references, the winner rule's decisions, and the rule in simulated experiments."""

import dataclasses
import functools
import json
import math

import numpy as np
import pytest

from flows.analysis.experiments import Tally, checkpoint, pick_winner, probability_best, threshold
from flows.analysis.lift import wilson


def miller(k_a: int, n_a: int, k_b: int, n_b: int) -> float:
    """P(p_B > p_A) for Beta(1 + k, 1 + n - k) posteriors, exactly (Evan Miller's sum, in logs)."""
    a_a, b_a, a_b, b_b = 1 + k_a, 1 + n_a - k_a, 1 + k_b, 1 + n_b - k_b

    def log_beta(x: float, y: float) -> float:
        return math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y)

    return math.fsum(math.exp(log_beta(a_a + i, b_a + b_b) - math.log(b_b + i) - log_beta(1 + i, b_b)
                              - log_beta(a_a, b_a)) for i in range(a_b))


TWO_ARMS = [((0, 0), (0, 0)), ((0, 10), (1, 10)), ((1, 2), (0, 2)), ((3, 50), (7, 50)), ((25, 500), (35, 500)),
            ((0, 500), (0, 2000)), ((100, 100), (99, 100)), ((410, 10_000), (600, 10_000)),
            ((1000, 20_000), (1040, 20_000)), ((60, 1000), (2, 20)), ((5, 10), (5000, 10_000)),
            ((0, 100_000), (3, 10))]


@pytest.mark.parametrize(("a", "b"), TWO_ARMS)
def test_p_best_of_two_variants_is_evan_millers_closed_form(a, b):
    """The requirement is an error below 0.005; the grid is within 1e-5 of the exact sum, edges included."""
    p_a, p_b = probability_best([a, b])
    exact = miller(*a, *b)
    assert p_b == pytest.approx(exact, abs=1e-5)
    assert p_a == pytest.approx(1 - exact, abs=1e-5)


@pytest.mark.parametrize("counts", [[(40, 1000), (50, 1000), (45, 1000)], [(3, 60), (0, 5), (30, 700), (9, 200)]])
def test_p_best_of_more_variants_matches_a_large_seeded_monte_carlo(counts):
    draws = 2_000_000
    rng = np.random.default_rng(17)
    rates = np.stack([rng.beta(1 + k, 1 + n - k, draws) for k, n in counts])
    reference = np.bincount(rates.argmax(axis=0), minlength=len(counts)) / draws
    ours = probability_best(counts)
    for p, q in zip(ours, reference, strict=True):
        # Five Monte Carlo standard errors (√(q(1-q)/draws) ≤ 0.00035): a miss is the grid's error, not chance.
        assert abs(p - q) < 5 * math.sqrt(max(q * (1 - q), 1e-6) / draws), (ours, reference)
    assert sum(ours) == pytest.approx(1, abs=1e-5)


def test_equal_variants_are_equally_likely_best():
    assert probability_best([(50, 1000)] * 3) == pytest.approx((1 / 3,) * 3, abs=1e-6)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        probability_best([(5, 4), (1, 4)])


def test_checkpoints_double_from_the_minimum_up_to_the_last_look():
    assert [checkpoint(n) for n in (0, 499, 500, 999, 1000, 1999, 2000, 8191, 16_000, 1_000_000)] == [
        None, None, 500, 500, 1000, 1000, 2000, 8000, 16_000, 16_000]
    assert checkpoint(3000, min_per_variant=1000, looks=2) == 2000
    assert threshold(0.95, 2, 6) == pytest.approx(1 - 0.05 / 12)


def test_no_winner_before_every_variant_has_the_minimum():
    decision = pick_winner([Tally("A", 5, 499), Tally("B", 90, 800)])
    assert decision.winner is None and decision.look == 0 and not decision.final
    assert decision.variants[1].p_best > 0.999  # overwhelming, and still too early
    assert decision.reason == "too few recipients: A has 499 of the 500 each variant needs"
    assert decision.summary() == "No winner yet: too few recipients (499/800 of 500 each)"


def test_a_winner_needs_the_threshold_at_a_checkpoint_not_the_plain_probability():
    # 4.0 % vs 6.2 % at 500 each: P(best) about 0.95, which the plain rule would call a win.
    early = pick_winner([Tally("A", 20, 500), Tally("B", 31, 500)])
    assert 0.94 < early.variants[1].p_best < early.threshold == pytest.approx(0.995833, abs=1e-6)
    assert early.winner is None and early.look == 1
    assert early.reason.endswith("short of 0.9958 at look 1 of 6 (500 each); next look at 1,000 each")
    assert early.summary().startswith("No winner yet: B leads 6.2 % vs 4.0 %, P(best) 0.9")

    won = pick_winner([Tally("A", 80, 2000), Tally("B", 120, 2000)])
    assert won.winner == "B" and won.final and won.look == 3 and won.checkpoint == 2000
    assert won.variants[1].p_best == probability_best([(80, 2000), (120, 2000)])[1] >= won.threshold
    assert won.summary() == f"B wins: 6.0 % vs 4.0 %, P(best) {won.variants[1].p_best:.3f}, 2,000/2,000 recipients"
    assert [v.interval for v in won.variants] == [wilson(80, 2000), wilson(120, 2000)]
    assert [v.rate for v in won.variants] == [0.04, 0.06]


def test_the_last_look_without_a_winner_ends_the_experiment():
    decision = pick_winner([Tally("A", 800, 16_000), Tally("B", 810, 16_000), Tally("C", 790, 16_000)])
    assert decision.winner is None and decision.final and decision.look == 6
    assert decision.reason.endswith("at look 6 of 6 (16,000 each); the last look: no winner")
    assert decision.summary().startswith("No winner: B leads 5.1 % vs 5.0 % (A), 4.9 % (C), P(best) ")


def test_a_look_reads_counts_at_its_checkpoint_only():
    """Counts past a checkpoint would be a look the threshold did not budget for."""
    with pytest.raises(ValueError, match=r"first 1,000 recipients .* got A 1,000, B 1,130"):
        pick_winner([Tally("A", 40, 1000), Tally("B", 70, 1130)])
    with pytest.raises(ValueError, match="at least two variants"):
        pick_winner([Tally("A", 40, 1000)])


def test_the_decision_is_frozen_and_records_as_json():
    decision = pick_winner([Tally("A", 80, 2000), Tally("B", 120, 2000)])
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.winner = "A"  # type: ignore[misc]
    recorded = json.loads(json.dumps(dataclasses.asdict(decision)))
    assert recorded["winner"] == "B" and recorded["variants"][1]["n"] == 2000


# The simulation: experiments run the way the rule is used. Each day a batch of recipients is
# split by the weights (a multinomial draw: the hash's shares are tested in
# tests/audience/test_variants.py), each recipient succeeds with its variant's true rate, and
# after each day the rule is evaluated; the experiment stops at its first decision, or after the
# last look (16,000 per variant: about 80 days for two variants).
REPETITIONS = 200
DAILY = 400
HORIZON = 500 * 2**5
NAMES = "ABCDEFGH"


@dataclasses.dataclass(frozen=True)
class Outcome:
    correct: float  # the share of experiments naming the truly best variant (none when they are equal)
    wrong: float  # naming another
    none: float  # ending without a winner
    median_recipients: float  # per variant, at the decision or the end


def traffic(rates: tuple[float, ...], rng: np.random.Generator, repetitions: int) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative recipients per repetition, day and variant; successes among each variant's first c recipients."""
    days = math.ceil(1.15 * HORIZON * len(rates) / DAILY)  # the smallest variant passes the horizon with room
    arrived = rng.multinomial(DAILY, [1 / len(rates)] * len(rates), size=(repetitions, days)).cumsum(axis=1)
    assert arrived[:, -1].min() >= HORIZON
    hits = rng.random((len(rates), repetitions, int(arrived.max()))) < np.array(rates)[:, None, None]
    prefix = np.concatenate([np.zeros((*hits.shape[:2], 1), dtype=np.int64), hits.cumsum(axis=2)], axis=2)
    return arrived, prefix


def tally(prefix: np.ndarray, repetition: int, recipients: np.ndarray) -> list[Tally]:
    return [Tally(NAMES[i], int(prefix[i, repetition, n]), int(n)) for i, n in enumerate(recipients)]


def the_rule(arrived: np.ndarray, prefix: np.ndarray, repetition: int) -> tuple[str | None, int]:
    """``pick_winner`` after each day on the counts at the checkpoint reached, until it decides."""
    last = None
    for today in arrived[repetition]:
        reached = checkpoint(int(today.min()))
        if reached is None or reached == last:
            continue  # the same counts as yesterday: the same decision (pick_winner is pure)
        last = reached
        decision = pick_winner(tally(prefix, repetition, np.full(len(today), reached)))
        if decision.final:
            return decision.winner, reached
    raise AssertionError("the last look was never reached")


def daily_at_95(arrived: np.ndarray, prefix: np.ndarray, repetition: int) -> tuple[str | None, int]:
    """The plain rule, for comparison: every day, all counts so far, P(best) ≥ 0.95 once each has 500."""
    for today in arrived[repetition]:
        if today.min() < 500:
            continue
        counts = tally(prefix, repetition, today)
        best = probability_best([(t.k, t.n) for t in counts])
        if max(best) >= 0.95:
            return counts[int(np.argmax(best))].name, int(today.min())
        if today.min() >= HORIZON:
            return None, int(today.min())
    raise AssertionError("the horizon was never reached")


@functools.cache
def simulate(rule_name: str, rates: tuple[float, ...], seed: int, repetitions: int = REPETITIONS) -> Outcome:
    """The share of experiments ending each way, printed; in batches of 200, the first the same for any total."""
    rule = {"the rule": the_rule, "daily at 0.95": daily_at_95}[rule_name]
    results = []
    for batch in range(math.ceil(repetitions / REPETITIONS)):
        size = min(REPETITIONS, repetitions - batch * REPETITIONS)
        arrived, prefix = traffic(rates, np.random.default_rng([seed, batch]), size)
        results += [rule(arrived, prefix, r) for r in range(size)]
    best = NAMES[rates.index(max(rates))] if rates.count(max(rates)) == 1 else None
    winners = [w for w, _ in results]
    outcome = Outcome(correct=sum(w is not None and w == best for w in winners) / repetitions,
                      wrong=sum(w is not None and w != best for w in winners) / repetitions,
                      none=winners.count(None) / repetitions,
                      median_recipients=float(np.median([n for _, n in results])))
    print(f"\n{rule_name}, true rates {' vs '.join(f'{r:.1%}' for r in rates)}, {repetitions:,} experiments: "
          f"right winner {outcome.correct:.1%}, wrong winner {outcome.wrong:.1%}, no winner {outcome.none:.1%}, "
          f"median {outcome.median_recipients:,.0f} recipients per variant at the end")
    return outcome


def test_simulation_with_a_known_best_the_rule_picks_it_at_least_95_percent_of_the_time():
    outcome = simulate("the rule", (0.04, 0.06), seed=1)
    # At least 190 of 200. 4 % vs 6 % shows at this threshold from about 2,000 recipients per variant and
    # the horizon is 16,000, so the rule's true rate is near 100 %: the test fails when the rule, P(best)
    # or the checkpoints break (a threshold that never decides, a winner taken from the wrong end).
    assert outcome.correct >= 0.95


def test_simulation_with_equal_variants_the_rule_names_a_wrong_winner_at_most_about_5_percent_of_the_time():
    outcome = simulate("the rule", (0.05, 0.05), seed=2)
    # The rule's bound is 5 % and its true rate close to it: 4.1 % over 4,000 experiments
    # (docs/experiments.md). 200 experiments cannot show "≤ 5 %" to the point: their standard error
    # at 5 % is 1.5 points, and a rule at 4.1 % shows more than 10 of 200 wrong for one seed in five
    # (this seed: 12, 6.0 %). So the test allows the sampling error of a rule exactly at 5 %: at most
    # 15 of 200 wrong (7.5 %), which such a rule exceeds with probability 4.4 % (P(X ≥ 16) for
    # X ~ Binomial(200, 0.05)), one at 4.1 % with 0.9 %. It fails for a rule that does not budget its
    # looks: one look at 0.95 (10 % wrong) fails it with probability 86 %, daily looks at 0.95 (52 %,
    # below) always. The seed is fixed, so the result is the same on every run.
    assert outcome.wrong <= 15 / 200
    assert outcome.correct == 0


def test_simulation_looking_daily_at_095_names_a_wrong_winner_far_more_often():
    """Why the rule has checkpoints and a stricter threshold: the same experiments under the plain rule."""
    assert simulate("daily at 0.95", (0.05, 0.05), seed=2).wrong > 0.25
    assert simulate("daily at 0.95", (0.04, 0.06), seed=1).correct >= 0.95
