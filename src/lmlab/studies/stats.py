"""Statistics for studies (PROTOCOL.md section 5): t-intervals, paired changes, Wilson intervals, decisions.

Pure functions over plain floats. Undefined quantities (an interval from one value, a test without
variance) are `None`, never a made-up number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from scipy import stats as _scipy_stats

Z95 = 1.959963984540054  # standard normal quantile for a two-sided 95% interval


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def t_interval(values: Sequence[float], confidence: float = 0.95) -> list[float] | None:
    """Two-sided t-interval for the mean; None with fewer than two values."""
    vals = _finite(values)
    n = len(vals)
    if n < 2:
        return None
    mean = sum(vals) / n
    sd = _std(vals)
    half = _scipy_stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return [mean - half, mean + half]


def _std(vals: list[float]) -> float:
    n = len(vals)
    if n < 2:
        return 0.0
    mean = sum(vals) / n
    return math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))


def describe(values: Sequence[float | None]) -> dict:
    """mean, sample std (ddof 1), 95% t-interval and the values themselves (finite ones)."""
    vals = _finite(values)
    if not vals:
        return {"mean": None, "std": None, "ci95": None, "values": [], "n": 0}
    return {
        "mean": sum(vals) / len(vals),
        "std": _std(vals) if len(vals) > 1 else None,
        "ci95": t_interval(vals),
        "values": vals,
        "n": len(vals),
    }


def paired_relative_change(candidate: Mapping[int, float], reference: Mapping[int, float]) -> dict | None:
    """Relative change of candidate vs reference in %, paired by seed.

    Per seed: 100 * (candidate - reference) / reference. Reports the mean, its 95% t-interval and the
    p-value of a two-sided one-sample t-test of the per-seed changes against 0 (a paired test on the
    relative scale, consistent with the interval).
    """
    seeds = sorted(s for s in candidate if s in reference)
    per_seed = {}
    for s in seeds:
        c, r = candidate[s], reference[s]
        if c is None or r is None or not math.isfinite(c) or not math.isfinite(r) or r == 0:
            continue
        per_seed[s] = 100.0 * (c - r) / abs(r)
    if not per_seed:
        return None
    vals = list(per_seed.values())
    p_value = None
    if len(vals) >= 2:
        mean = sum(vals) / len(vals)
        # A std at float round-off of the mean is no variance (e.g. a parameter count): no t-test on noise.
        if _std(vals) > 1e-12 * max(abs(mean), 1e-300):
            p_value = float(_scipy_stats.ttest_1samp(vals, 0.0).pvalue)
        elif vals[0] != 0:
            p_value = 0.0  # identical non-zero changes on every seed: no variance, the effect is certain
    return {
        "delta_pct": sum(vals) / len(vals),
        "ci95": t_interval(vals),
        "p_value": p_value,
        "per_seed": {str(s): v for s, v in per_seed.items()},
        "n": len(vals),
    }


def wilson_interval(successes: int, total: int, z: float = Z95) -> list[float] | None:
    """Wilson score interval for a binomial proportion; None when there are no trials."""
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
