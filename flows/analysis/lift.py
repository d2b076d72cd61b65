"""The statistics behind a holdout's verdict: pure functions, checked against statsmodels in the tests.

Conversion rates get score intervals, which keep their coverage for small arms and rates
near 0 where the textbook ``p ± z·√(pq/n)`` collapses to a point: Wilson's for one rate,
Newcombe's hybrid score interval (Newcombe 1998, method 10) for the difference of two.
Revenue per recipient is mostly zeros with a long tail, so its difference gets a
percentile bootstrap rather than a normal interval. The sample size says how many
recipients an arm needs before a lift of a chosen size would show.
"""

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

Interval = tuple[float, float]

Z95 = NormalDist().inv_cdf(0.975)  # 1.95996…: the two-sided 95 % quantile
# Draws per bootstrap batch: bounds memory (8 bytes each, twice) whatever the arm's size.
_BATCH_DRAWS = 4_000_000
# Listed values per arm up to which every resample draws them one by one (see below).
EXACT_UP_TO = 20_000


def wilson(k: int, n: int, z: float = Z95) -> Interval:
    """Wilson's score interval for a proportion of ``k`` in ``n`` (``(0, 1)`` when ``n`` is 0)."""
    if not 0 <= k <= n:
        raise ValueError(f"0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # At k = 0 or k = n one end is exactly 0 or 1; rounding must not push it past.
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


def newcombe(k1: int, n1: int, k2: int, n2: int, z: float = Z95) -> Interval:
    """Newcombe's hybrid score interval for ``k1/n1 - k2/n2``, from the two Wilson intervals.

    ``(p1 - p2) - √((p1 - l1)² + (u2 - p2)²)`` to ``(p1 - p2) + √((u1 - p1)² + (p2 - l2)²)``
    (Newcombe 1998, method 10: no continuity correction). An empty arm says nothing: ``(-1, 1)``.
    """
    if n1 == 0 or n2 == 0:
        return -1.0, 1.0
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1, z)
    l2, u2 = wilson(k2, n2, z)
    difference = p1 - p2
    return (difference - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2),
            difference + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))


def bootstrap_mean_difference(a: Sequence[float], b: Sequence[float], *, seed: int, resamples: int = 2000,
                              zeros_a: int = 0, zeros_b: int = 0, confidence: float = 0.95,
                              exact_up_to: int = EXACT_UP_TO) -> Interval:
    """A percentile bootstrap interval for ``mean(a) - mean(b)``, the same for the same seed.

    Each resample draws ``len(a)`` values from ``a`` with replacement, and ``len(b)`` from
    ``b``, independently (the arms are independent samples); the interval is the
    ``(1 - confidence)/2`` and ``(1 + confidence)/2`` quantiles of the resampled
    differences (numpy's default, linear, quantile).

    ``zeros_a``/``zeros_b``: that many more zeros in each arm, not listed (the recipients
    who bought nothing). They are resampled exactly as if listed, only faster: the number
    of non-zero values a resample draws is binomial, and only those are drawn. Revenue per
    recipient is mostly zeros, so a resample costs its converters, not its recipients.

    An arm with more than ``exact_up_to`` listed values (20,000 buyers: 40 M draws per arm
    at 2,000 resamples, a second or two) keeps the exact binomial count ``K`` of a
    resample's non-zero draws, and draws their sum from its normal limit, mean ``K·m`` and
    variance ``K·s²`` (``m``, ``s²``: the listed values' mean and variance): the skew a sum
    of 20,000 draws keeps is the values' own over √20,000, below 1 % for order values.
    """
    if resamples < 1:
        raise ValueError(f"at least one resample, got {resamples}")
    import numpy as np  # here, not on import: the report's holdout thread imports it while the ledger is read

    rng = np.random.default_rng(seed)
    differences = (_resampled_means(rng, a, zeros_a, resamples, exact_up_to)
                   - _resampled_means(rng, b, zeros_b, resamples, exact_up_to))
    tail = (1 - confidence) / 2
    low, high = np.quantile(differences, [tail, 1 - tail])
    return float(low), float(high)


def _resampled_means(rng: "np.random.Generator", values: Sequence[float], zeros: int, resamples: int,
                     exact_up_to: int) -> "np.ndarray":
    import numpy as np

    listed = np.asarray(values, dtype=np.float64)
    n = len(listed) + zeros
    if n == 0:
        raise ValueError("an empty arm has no mean")
    if len(listed) == 0:
        return np.zeros(resamples)
    # How many of each resample's n draws fall on a listed value (the rest are zeros).
    hits = rng.binomial(n, len(listed) / n, size=resamples) if zeros else np.full(resamples, n)
    if len(listed) > exact_up_to:
        spread = np.sqrt(hits * listed.var())
        limit: np.ndarray = (hits * listed.mean() + spread * rng.standard_normal(resamples)) / n
        return limit
    sums = np.empty(resamples)
    start = 0
    while start < resamples:
        end = start + 1
        drawn = int(hits[start])
        while end < resamples and drawn + hits[end] <= _BATCH_DRAWS:
            drawn += int(hits[end])
            end += 1
        picks = listed[rng.integers(0, len(listed), size=drawn)]
        owner = np.repeat(np.arange(end - start), hits[start:end])
        sums[start:end] = np.bincount(owner, weights=picks, minlength=end - start)
        start = end
    means: np.ndarray = sums / n
    return means


def sample_size(p_control: float, effect: float, ratio: float = 1.0, *, alpha: float = 0.05,
                power: float = 0.8) -> int:
    """Held-out recipients needed to detect an absolute lift ``effect`` over ``p_control``, with
    ``ratio`` treated recipients per held-out one (a 20 % holdout: ratio 4), so the treated arm
    needs ``ratio`` times as many.

    The two-sided normal test of the difference with each arm's own variance:
    ``n = (z₁₋α/₂ + z_power)² · (p₀q₀ + p₁q₁/ratio) / effect²``, with ``p₁ = p₀ + effect``
    (statsmodels' ``NormalIndPower`` for the matching effect size gives the same).
    """
    treated = p_control + effect
    if not 0 <= p_control <= 1 or not 0 <= treated <= 1 or effect == 0:
        raise ValueError(f"rates in [0, 1] and a non-zero effect, got {p_control} and {p_control} + {effect}")
    if ratio <= 0:
        raise ValueError(f"a positive ratio of treated to held out, got {ratio}")
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    variance = p_control * (1 - p_control) + treated * (1 - treated) / ratio
    return max(1, math.ceil(z * z * variance / (effect * effect)))
