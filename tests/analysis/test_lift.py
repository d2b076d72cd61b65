"""The interval maths, checked against statsmodels, and the bootstrap and sample size against their definitions."""

import math
import random
from statistics import NormalDist

import numpy as np
import pytest
from statsmodels.stats.power import NormalIndPower
from statsmodels.stats.proportion import confint_proportions_2indep, proportion_confint

from flows.analysis.lift import Z95, bootstrap_mean_difference, newcombe, sample_size, wilson

SIZES = [1, 2, 3, 5, 10, 37, 100, 1000, 25_000]


def counts(n: int) -> list[int]:
    """0, 1, n-1, n and a few between: the edges are where intervals go wrong."""
    return sorted({0, 1, n // 3, n // 2, max(n - 1, 0), n})


@pytest.mark.parametrize("n", SIZES)
def test_wilson_matches_statsmodels_on_every_count_including_none_and_all(n):
    for k in counts(n):
        expected = proportion_confint(k, n, alpha=0.05, method="wilson")
        assert wilson(k, n) == pytest.approx(expected, abs=1e-12), (k, n)


def test_wilson_stays_inside_zero_and_one_and_says_nothing_of_an_empty_arm():
    assert wilson(0, 0) == (0.0, 1.0)
    assert wilson(0, 7)[0] == 0.0 and wilson(7, 7)[1] == 1.0
    z99 = NormalDist().inv_cdf(0.995)
    assert wilson(50, 100, z=z99) == pytest.approx(proportion_confint(50, 100, alpha=0.01, method="wilson"))
    with pytest.raises(ValueError):
        wilson(3, 2)


@pytest.mark.parametrize("n1, n2", [(1, 1), (2, 5), (10, 3), (40, 160), (1000, 250), (20_000, 5000)])
def test_newcombe_matches_statsmodels_on_a_grid_of_arms_and_counts(n1, n2):
    for k1 in counts(n1):
        for k2 in counts(n2):
            expected = confint_proportions_2indep(k1, n1, k2, n2, method="newcomb", compare="diff", alpha=0.05)
            assert newcombe(k1, n1, k2, n2) == pytest.approx(expected, abs=1e-12), (k1, n1, k2, n2)


def test_newcombe_brackets_the_observed_difference_and_narrows_as_arms_grow():
    small, large = newcombe(6, 50, 3, 50), newcombe(600, 5000, 300, 5000)
    for (low, high), difference in ((small, 0.06), (large, 0.06)):
        assert low < difference < high
    assert large[1] - large[0] < (small[1] - small[0]) / 5
    assert newcombe(1, 0, 0, 10) == (-1.0, 1.0)


def test_the_bootstrap_is_the_same_for_the_same_seed_and_differs_for_another():
    rnd = random.Random(3)
    a = [rnd.expovariate(1 / 40) for _ in range(300)]
    b = [rnd.expovariate(1 / 30) for _ in range(120)]
    first = bootstrap_mean_difference(a, b, seed=11)
    assert bootstrap_mean_difference(a, b, seed=11) == first
    assert bootstrap_mean_difference(a, b, seed=12) != first
    assert first[0] < np.mean(a) - np.mean(b) < first[1]


def test_the_bootstrap_interval_matches_the_textbook_percentile_bootstrap_and_the_normal_interval():
    rng = np.random.default_rng(5)
    a, b = rng.gamma(2.0, 20.0, 800), rng.gamma(2.0, 15.0, 400)
    ours = bootstrap_mean_difference(list(a), list(b), seed=1, resamples=4000)
    # The plain algorithm: resample each arm whole, take the means' difference, read the quantiles.
    plain = np.random.default_rng(99)
    differences = [plain.choice(a, len(a)).mean() - plain.choice(b, len(b)).mean() for _ in range(4000)]
    textbook = np.quantile(differences, [0.025, 0.975])
    standard_error = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    normal = (a.mean() - b.mean() - Z95 * standard_error, a.mean() - b.mean() + Z95 * standard_error)
    assert ours == pytest.approx(tuple(textbook), abs=0.2 * standard_error)
    assert ours == pytest.approx(normal, abs=0.2 * standard_error)


def test_unlisted_zeros_resample_exactly_like_listed_ones():
    """Revenue per recipient is mostly zeros: passing their count instead of the zeros is the same bootstrap."""
    rng = np.random.default_rng(8)
    buyers_a, buyers_b = list(rng.gamma(2.0, 30.0, 60)), list(rng.gamma(2.0, 30.0, 15))
    compact = bootstrap_mean_difference(buyers_a, buyers_b, seed=4, resamples=4000, zeros_a=940, zeros_b=235)
    listed = bootstrap_mean_difference(buyers_a + [0.0] * 940, buyers_b + [0.0] * 235, seed=4, resamples=4000)
    spread = compact[1] - compact[0]
    assert compact == pytest.approx(listed, abs=0.08 * spread)  # two Monte Carlo runs of one distribution
    assert bootstrap_mean_difference([], [], seed=1, zeros_a=5, zeros_b=5) == (0.0, 0.0)
    with pytest.raises(ValueError):
        bootstrap_mean_difference([], [1.0], seed=1)


@pytest.mark.parametrize("p_control, effect, ratio", [(0.05, 0.01, 4.0), (0.02, 0.005, 9.0), (0.3, -0.05, 1.0),
                                                      (0.0, 0.01, 4.0), (0.5, 0.1, 0.25)])
def test_sample_size_agrees_with_statsmodels_normal_power_for_unequal_arms(p_control, effect, ratio):
    treated = p_control + effect
    spread = math.sqrt(p_control * (1 - p_control) + treated * (1 - treated) / ratio)
    # NormalIndPower's effect size d with nobs2 = ratio · nobs1 tests d·√(nobs1/(1 + 1/ratio)):
    # the difference over its standard error at nobs1 when d = effect·√(1 + 1/ratio) / spread.
    d = abs(effect) * math.sqrt(1 + 1 / ratio) / spread
    expected = NormalIndPower().solve_power(effect_size=d, alpha=0.05, power=0.8, ratio=ratio,
                                            alternative="two-sided")
    assert sample_size(p_control, effect, ratio) == math.ceil(expected - 1e-9)


def test_the_sample_size_gives_80_percent_power_and_grows_with_a_smaller_effect():
    n = sample_size(0.05, 0.02, 4.0)
    standard_error = math.sqrt(0.05 * 0.95 / n + 0.07 * 0.93 / (4 * n))
    power = NormalDist().cdf(0.02 / standard_error - Z95)
    assert 0.8 <= power < 0.81
    assert sample_size(0.05, 0.01, 4.0) > 3.5 * n
    assert sample_size(0.05, 0.02, 9.0) < n  # more treated recipients: fewer held-out ones needed
    with pytest.raises(ValueError):
        sample_size(0.995, 0.01, 4.0)


def test_a_large_arms_resampled_sums_come_from_their_normal_limit_and_give_the_exact_bootstraps_interval():
    rng = np.random.default_rng(21)
    buyers_a, buyers_b = list(rng.gamma(2.0, 3000.0, 3000)), list(rng.gamma(2.0, 3000.0, 400))
    shape = {"seed": 9, "resamples": 4000, "zeros_a": 27_000, "zeros_b": 3600}
    exact = bootstrap_mean_difference(buyers_a, buyers_b, **shape)
    limit = bootstrap_mean_difference(buyers_a, buyers_b, exact_up_to=100, **shape)
    assert limit == pytest.approx(exact, abs=0.05 * (exact[1] - exact[0]))
    assert bootstrap_mean_difference(buyers_a, buyers_b, exact_up_to=100, **shape) == limit
