"""Study statistics against scipy and closed forms: t-intervals, paired relative change, Wilson, scenarios."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from lmlab.stats import (
    describe,
    paired_relative_change,
    reference_is_zero,
    scenario,
    t_interval,
    wilson_interval,
)


@pytest.mark.parametrize("values", [[1.0, 2.0], [3.1, 2.9, 3.4], [10.0, 12.5, 9.75, 11.0, 10.5], [-1.0, 0.0, 5.0, 2.0]])
@pytest.mark.parametrize("confidence", [0.95, 0.9])
def test_t_interval_equals_scipy(values, confidence):
    expected = stats.t.interval(confidence, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert t_interval(values, confidence) == pytest.approx(list(expected), rel=1e-12)


def test_t_interval_is_undefined_for_fewer_than_two_values_and_skips_non_finite():
    assert t_interval([]) is None and t_interval([3.0]) is None
    assert t_interval([1.0, float("nan"), 2.0, None, float("inf")]) == pytest.approx(t_interval([1.0, 2.0]))


def test_describe_reports_mean_sample_std_and_interval():
    values = [4.0, 6.0, 5.5, None]
    d = describe(values)
    assert d["n"] == 3 and d["values"] == [4.0, 6.0, 5.5]
    assert d["mean"] == pytest.approx(np.mean([4.0, 6.0, 5.5]))
    assert d["std"] == pytest.approx(np.std([4.0, 6.0, 5.5], ddof=1))
    assert d["ci95"] == pytest.approx(t_interval([4.0, 6.0, 5.5]))
    assert describe([2.0])["std"] is None and describe([])["mean"] is None


def test_a_value_every_seed_shares_has_no_spread_and_reads_as_shared():
    """Three seeds of a shared 0.025 (5 of 200 items): (0.025 + 0.025 + 0.025) / 3 is not 0.025 in floats, and the
    spread it would leave (4e-18) once printed as `0.025000 ± 4.2e-18` in a results table."""
    from lmlab.studies.report import _mean_std

    assert sum([0.025] * 3) / 3 != 0.025  # the rounding this guards against
    d = describe([0.025] * 3)
    assert d["mean"] == 0.025 and d["std"] == 0.0 and d["ci95"] == [0.025, 0.025]
    assert _mean_std(d) == "0.025 (same on every seed)"
    assert paired_relative_change({1: 0.05, 2: 0.05, 3: 0.05}, {1: 0.025, 2: 0.025, 3: 0.025})["constant"]


def test_paired_relative_change_is_a_log_ratio_interval_reported_as_percent():
    reference = {42: 20.0, 123: 21.0, 456: 19.5, 789: 20.4}
    candidate = {42: 19.0, 123: 20.5, 456: 19.4, 789: 19.8, 1011: 5.0}  # 1011 has no reference: unpaired
    result = paired_relative_change(candidate, reference)
    seeds = (42, 123, 456, 789)
    logs = np.log([candidate[s] / reference[s] for s in seeds])
    assert result["n"] == 4 and result["scale"] == "log" and not result["constant"]
    assert list(result["per_seed"].values()) == pytest.approx([100 * (candidate[s] / reference[s] - 1) for s in seeds])
    assert set(result["per_seed"]) == {"42", "123", "456", "789"}
    assert result["delta_pct"] == pytest.approx(100 * (np.exp(logs.mean()) - 1))  # geometric mean ratio
    assert result["p_value"] == pytest.approx(stats.ttest_1samp(logs, 0.0).pvalue, rel=1e-10)
    lo, hi = stats.t.interval(0.95, 3, loc=logs.mean(), scale=stats.sem(logs))
    assert result["ci95"] == pytest.approx([100 * (np.exp(lo) - 1), 100 * (np.exp(hi) - 1)])


def test_a_ratio_interval_never_falls_below_minus_100_percent():
    # The MU default's failure: seeds disagree wildly; a linear interval read "[-127.93%, +189.79%]".
    result = paired_relative_change({1: 400.0, 2: 90.0, 3: 250.0}, {1: 100.0, 2: 180.0, 3: 150.0})
    assert result["ci95"][0] > -100.0 and result["ci95"][0] < result["delta_pct"] < result["ci95"][1]


def test_paired_relative_change_with_zeros_or_negatives_is_linear():
    result = paired_relative_change({1: 0.0, 2: 0.5, 3: 1.0}, {1: 0.5, 2: 0.5, 3: 0.5})
    changes = [-100.0, 0.0, 100.0]
    assert result["scale"] == "linear" and result["delta_pct"] == pytest.approx(np.mean(changes))
    assert result["ci95"] == pytest.approx(list(stats.t.interval(0.95, 2, loc=0.0, scale=stats.sem(changes))))


def test_paired_relative_change_edge_cases():
    assert paired_relative_change({1: 2.0}, {2: 2.0}) is None  # nothing paired
    one = paired_relative_change({42: 9.0}, {42: 10.0})
    assert one["delta_pct"] == pytest.approx(-10.0) and one["ci95"] is None and one["p_value"] is None
    # -10% on both seeds: one shared measurement (or a deterministic count), no interval and no p-value - never p = 0
    same = paired_relative_change({1: 9.0, 2: 18.0}, {1: 10.0, 2: 20.0})
    assert same["delta_pct"] == pytest.approx(-10.0) and same["constant"]
    assert same["p_value"] is None and same["ci95"] is None
    skipped = paired_relative_change({1: 9.0, 2: float("nan"), 3: 1.0}, {1: 10.0, 2: 5.0, 3: 0.0})
    assert skipped["n"] == 1 and list(skipped["per_seed"]) == ["1"]
    assert paired_relative_change({1: 0.0, 2: 0.0}, {1: 0.0, 2: 0.0}) is None
    assert reference_is_zero({1: 0.0, 2: 0.1}, {1: 0.0, 2: 0.0}) and not reference_is_zero({1: 1.0}, {1: 2.0})


def wilson_by_quadratic(k: int, n: int, z: float) -> list[float]:
    """The Wilson interval as the roots in p of (p_hat - p)^2 = z^2 p (1 - p) / n."""
    p_hat = k / n
    a = 1 + z * z / n
    b = -(2 * p_hat + z * z / n)
    c = p_hat * p_hat
    disc = math.sqrt(b * b - 4 * a * c)
    return [(-b - disc) / (2 * a), (-b + disc) / (2 * a)]


@pytest.mark.parametrize(("k", "n"), [(0, 10), (10, 10), (3, 10), (1, 1), (0, 1), (57, 120), (999, 1000)])
def test_wilson_interval_equals_the_closed_form(k, n):
    z = stats.norm.ppf(0.975)
    lo, hi = wilson_interval(k, n)
    assert [lo, hi] == pytest.approx(wilson_by_quadratic(k, n, z), abs=1e-12)
    assert 0.0 <= lo <= hi <= 1.0
    assert lo <= k / n <= hi


@pytest.mark.parametrize("n", [3, 10, 100])
def test_wilson_interval_reaches_zero_and_one_exactly(n):
    assert wilson_interval(0, n)[0] == 0.0
    assert wilson_interval(n, n)[1] == 1.0


def test_wilson_interval_without_trials_is_undefined():
    assert wilson_interval(0, 0) is None


@pytest.mark.parametrize(("improvement", "interval", "expected"), [
    (2.0, [1.5, 2.5], "A"),
    (5.0, [0.1, 9.9], "A"),
    (1.9999, [1.5, 2.5], "B"),
    (1.0, [0.5, 1.5], "B"),
    (0.9999, [0.5, 1.5], "C"),
    (0.5, [0.2, 0.8], "C"),
    (0.4999, [0.2, 0.8], "D"),
    (-3.0, [-4.0, -2.0], "D"),  # significantly worse is below the bar too
    (3.0, [-0.1, 6.1], "not-significant"),
    (3.0, [0.0, 6.0], "not-significant"),  # an interval touching 0 contains it
    (-1.0, [-2.0, 0.0], "not-significant"),
    (3.0, None, "not-significant"),
    (None, [1.0, 2.0], "not-significant"),
])
def test_scenario_boundaries(improvement, interval, expected):
    assert scenario(improvement, interval) == expected


def test_one_seed_is_never_significant():
    change = paired_relative_change({42: 8.0}, {42: 10.0})  # perplexity 20% lower on the only seed
    assert scenario(-change["delta_pct"], change["ci95"]) == "not-significant"
