"""Statistics for studies (docs/protocol.md section 5): t-intervals, paired changes, Wilson intervals, decisions.

Pure functions over plain floats. Undefined quantities (an interval from one value, a test without
variance) are `None`, never a made-up number.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Mapping, Sequence

import numpy as np

Z95 = 1.959963984540054  # standard normal quantile for a two-sided 95% interval


@functools.cache
def _scipy_stats():
    """scipy.stats, imported on first use: about 0.6 s at startup that a process computing no statistic (a parallel
    worker, a pretraining process, a command refused for bad input) does not pay."""
    from scipy import stats

    return stats


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def t_interval(values: Sequence[float], confidence: float = 0.95) -> list[float] | None:
    """Two-sided t-interval for the mean; None with fewer than two values."""
    vals = _finite(values)
    n = len(vals)
    if n < 2:
        return None
    mean = _mean(vals)
    sd = _std(vals)
    half = _scipy_stats().t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return [mean - half, mean + half]


def _mean(vals: list[float]) -> float:
    """The mean; exactly the value where all values are equal (the sum of three 0.025s over 3 is not 0.025 in floats,
    which would give a measurement every seed shares a spread of 4e-18)."""
    if all(v == vals[0] for v in vals):
        return vals[0]
    return sum(vals) / len(vals)


def _std(vals: list[float]) -> float:
    n = len(vals)
    if n < 2:
        return 0.0
    mean = _mean(vals)
    return math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))


def describe(values: Sequence[float | None]) -> dict:
    """mean, sample std (ddof 1), 95% t-interval and the values themselves (finite ones)."""
    vals = _finite(values)
    if not vals:
        return {"mean": None, "std": None, "ci95": None, "values": [], "n": 0}
    return {
        "mean": _mean(vals),
        "std": _std(vals) if len(vals) > 1 else None,
        "ci95": t_interval(vals),
        "values": vals,
        "n": len(vals),
    }


def paired_relative_change(candidate: Mapping[int, float], reference: Mapping[int, float]) -> dict | None:
    """Relative change of candidate vs reference in %, paired by seed.

    A relative change is a ratio, so where every paired value is positive (perplexities, accuracies, times) it is
    computed on the log scale: per seed l = ln(candidate / reference); the mean of l, its 95% t-interval and the
    two-sided one-sample t-test of l against 0 are reported back as percentages, 100 * (exp(x) - 1). The change is
    then the geometric mean ratio and its interval can never fall below -100% (a perplexity cannot fall by more
    than all of it). With a zero or negative value in a pair the scale is linear: per seed
    100 * (candidate - reference) / |reference|. `scale` says which.

    Identical changes on every seed (a measurement shared by all seeds, such as a deterministic system's accuracy,
    or a parameter count) have no spread to test: `constant` is True, and the interval and p-value are None -
    "one shared measurement", never p = 0 with a zero-width interval. Pairs whose reference is 0 are skipped
    (the relative change is undefined there); `undefined_reference_zero` tells whether that is why nothing paired.
    """
    seeds = sorted(s for s in candidate if s in reference)
    pairs = {}
    for s in seeds:
        c, r = candidate[s], reference[s]
        if c is not None and r is not None and math.isfinite(c) and math.isfinite(r) and r != 0:
            pairs[s] = (float(c), float(r))
    if not pairs:
        return None
    log_scale = all(c > 0 and r > 0 for c, r in pairs.values())
    per_seed = {s: 100.0 * (c - r) / abs(r) for s, (c, r) in pairs.items()}
    vals = [math.log(c / r) for c, r in pairs.values()] if log_scale else list(per_seed.values())
    back = (lambda x: 100.0 * math.expm1(x)) if log_scale else (lambda x: x)
    mean = _mean(vals)
    constant = len(vals) >= 2 and _std(vals) <= 1e-12 * max(abs(mean), 1e-300)
    interval = None if constant else t_interval(vals)
    p_value = None
    if interval is not None:
        p_value = float(_scipy_stats().ttest_1samp(vals, 0.0).pvalue)
    return {
        "delta_pct": back(mean),
        "ci95": [back(interval[0]), back(interval[1])] if interval else None,
        "p_value": p_value,
        "per_seed": {str(s): v for s, v in per_seed.items()},
        "n": len(vals),
        "scale": "log" if log_scale else "linear",
        "constant": constant,
    }


def reference_is_zero(candidate: Mapping[int, float], reference: Mapping[int, float]) -> bool:
    """True when the seeds both have are all ones where the reference is 0: the relative change is undefined."""
    seeds = [s for s in candidate if s in reference and candidate[s] is not None and reference[s] is not None]
    return bool(seeds) and all(reference[s] == 0 for s in seeds)


def wilson_interval(successes: float, total: int, z: float = Z95) -> list[float] | None:
    """Wilson score interval for a binomial proportion (successes may be a mean count, e.g. averaged over seeds);
    None when there are no trials."""
    if total <= 0:
        return None
    p = successes / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    # At k = 0 or k = n one end is exactly 0 or 1; do not let round-off exclude the observed value.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == total else min(1.0, centre + half)
    return [low, high]


def scenario(improvement_pct: float | None, interval: Sequence[float] | None) -> str:
    """The notes' rule: A >= 2%, B 1-2%, C 0.5-1%, D < 0.5%; `not-significant` when the interval holds 0.

    `improvement_pct` is positive when the candidate is better. Without an interval (one seed) nothing
    is significant.
    """
    if improvement_pct is None or interval is None or interval[0] <= 0.0 <= interval[1]:
        return "not-significant"
    if improvement_pct >= 2.0:
        return "A"
    if improvement_pct >= 1.0:
        return "B"
    if improvement_pct >= 0.5:
        return "C"
    return "D"


# ---------------------------------------------------------------------------------------------------
# Paired tests over evaluation items (every seed evaluates the same items)

def round_ratios(ours: Sequence[float], reference: Sequence[float]) -> list[float]:
    """Each round's ours / reference, for timings where the two ran next to each other in every round."""
    return [a / b for a, b in zip(ours, reference, strict=True)]


def paired_ratio(ours: Sequence[float], reference: Sequence[float]) -> float:
    """Median over rounds of ours / reference (the two ran next to each other in each round)."""
    return statistics.median(round_ratios(ours, reference))


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """Distribution-free confidence interval of the median: the order statistics (k, n + 1 - k) where k is the
    largest rank with P(Binomial(n, 1/2) < k) <= (1 - level) / 2 (n = 31: ranks 10 and 22, coverage 97%).
    None when there are too few values for any interval to reach `level` (fewer than 6 at 95%, e.g. --quick)."""
    ordered = sorted(values)
    n = len(ordered)
    k = int(_scipy_stats().binom.ppf((1 - level) / 2, n, 0.5))  # the smallest k with P(B <= k) >= alpha / 2
    return (ordered[k - 1], ordered[n - k]) if k >= 1 else None


BOOTSTRAP_RESAMPLES = 10_000


def sign_test(better: int, worse: int) -> float:
    """Two-sided exact sign test: how many pairs favour each side, against a fair coin (ties left out). 1.0 without
    untied pairs. On discordant items it is the exact McNemar test."""
    if better + worse == 0:
        return 1.0
    return float(_scipy_stats().binomtest(min(better, worse), better + worse, 0.5).pvalue)


def mcnemar_exact(better: int, worse: int) -> float:
    """Two-sided exact McNemar test: the discordant pairs (`better`: only the first system right, `worse`: only the
    second) against a fair coin - the sign test on them. 1.0 without discordant pairs."""
    return sign_test(better, worse)


def _as_matrix(outcomes) -> np.ndarray:
    """Seeds x items of 0/1 (a single row for a measurement shared by the seeds)."""
    matrix = np.asarray(outcomes, dtype=float)
    return matrix[None, :] if matrix.ndim == 1 else matrix


def paired_item_difference(first, second, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """Accuracy of `first` minus `second` over the same items, each a seeds x items 0/1 matrix (one row when the
    system is one measurement shared by the seeds, e.g. a text-only baseline).

    Per item, each system's outcome is averaged over its seeds, so an item counts once however many seeds evaluated
    it. The 95% interval is a paired bootstrap over items (an item is resampled with all its seeds: the seeds are
    clustered within the item they share); the p-value is a two-sided sign-flip permutation test of the per-item
    differences (swapping the two systems' labels within an item). Where no item differs, the interval is +- the
    Wilson upper bound of a discordant rate of 0 of n (a percentile bootstrap would read [0, 0]). `resamples` draws
    from a fixed `seed`, so a report regenerates the same numbers."""
    a, b = _as_matrix(first), _as_matrix(second)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"the systems were evaluated on different items ({a.shape[1]} vs {b.shape[1]})")
    per_item = a.mean(axis=0) - b.mean(axis=0)
    n = per_item.size
    rng = np.random.default_rng(seed)
    boot = per_item[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    observed = float(per_item.mean())
    flips = rng.choice(np.array([-1.0, 1.0]), size=(resamples, n))
    null = (flips * per_item).mean(axis=1)
    extreme = int(np.sum(np.abs(null) >= abs(observed) - 1e-12))
    p_value = 1.0 if not np.any(per_item) else (1 + extreme) / (resamples + 1)
    low, high = np.percentile(boot, [2.5, 97.5])
    if not np.any(per_item):  # no discordant item: the bootstrap collapses to [0, 0]; bound the discordant rate
        low, high = -wilson_interval(0, n)[1], wilson_interval(0, n)[1]  # instead (at most z^2 / (n + z^2))
    return {"difference": observed, "ci95": [float(low), float(high)], "p_value": float(p_value),
            "items": int(n), "seeds": [int(a.shape[0]), int(b.shape[0])],
            "first": float(a.mean()), "second": float(b.mean())}


def item_accuracy_interval(outcomes) -> dict:
    """Accuracy of a seeds x items 0/1 matrix (mean over seeds) with a 95% Wilson interval over the items: an item
    counts once however many seeds evaluated it (seeds evaluate the same items, so pooling seeds x items as
    independent trials would overstate the precision). Averaging an item over seeds can only lower its variance,
    so the interval is conservative; unlike a percentile bootstrap it stays honest at 0 and 1."""
    m = _as_matrix(outcomes)
    n = m.shape[1]
    accuracy = float(m.mean())
    return {"accuracy": accuracy, "ci95": wilson_interval(accuracy * n, n), "items": n, "seeds": int(m.shape[0])}
