"""LatentWire inference over items: every seed evaluates the same items, and the text-only systems are one shared
evaluation. Paired tests (McNemar per cell, a paired bootstrap / sign-flip test pooled over seeds) checked against
independent computations and planted effects."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from scipy import stats as scipy_stats

from lmlab import stats
from lmlab.studies.latentwire_study import SYSTEMS, _bridge_section, item_statistics
from lmlab.studies.rundir import RunDir

ITEMS = 60


def write_cell(run: RunDir, config: str, seed: int, outcomes: dict[str, list[int]]) -> dict:
    """A finished cell's eval_samples.jsonl with the planted per-item correctness, and its results row."""
    cell = run.cell_dir(config, seed)
    cell.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(ITEMS):
        systems = {s: {"output": f"{s}{outcomes[s][i]}", "strict": None, "flexible": "1" if outcomes[s][i] else "0",
                       "correct_strict": bool(outcomes[s][i]), "correct_flexible": bool(outcomes[s][i])}
                   for s in SYSTEMS}
        lines.append(json.dumps({"index": i, "question": f"q{i}", "gold": "1", "systems": systems}))
    (cell / "eval_samples.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"config": config, "seed": seed, "status": "ok", "metrics": {}, "details": {"arm": {}}}


def planted(rng: np.random.Generator, bridged: float, control: float, text: dict[str, list[int]]) -> dict:
    out = {"bridged": list((rng.random(ITEMS) < bridged).astype(int)),
           "zero_prefix": list((rng.random(ITEMS) < control).astype(int)),
           "shuffled_source": list((rng.random(ITEMS) < control).astype(int))}
    return {**out, **text}


@pytest.fixture
def run_dir(tmp_path) -> RunDir:
    return RunDir(tmp_path)


def test_seeds_sharing_items_do_not_narrow_the_interval(run_dir):
    # Three seeds that agree item by item carry the information of one: pooling them as 3 x 60 independent trials
    # (the old Wilson interval) would shrink the interval by ~sqrt(3).
    rng = np.random.default_rng(0)
    text = {s: list((rng.random(ITEMS) < 0.5).astype(int)) for s in ("target_text", "source_text", "token_budget")}
    one = planted(rng, 0.4, 0.1, text)
    rows = [write_cell(run_dir, "k8", seed, one) for seed in (1, 2, 3)]
    entry = item_statistics(run_dir, rows, ["k8"])["k8"]
    bridged = entry["accuracy"]["bridged"]
    single = stats.item_accuracy_interval(np.array([one["bridged"]] * 2))  # bootstrap over items of one seed's row
    assert bridged["ci95"] == pytest.approx(single["ci95"])
    pooled_wilson = stats.wilson_interval(3 * sum(one["bridged"]), 3 * ITEMS)
    assert bridged["ci95"][1] - bridged["ci95"][0] > 1.5 * (pooled_wilson[1] - pooled_wilson[0])
    # the text-only systems are one shared evaluation: counted once, Wilson over the items
    assert entry["accuracy"]["target_text"]["seeds"] == 1
    assert entry["accuracy"]["target_text"]["ci95"] == stats.wilson_interval(sum(text["target_text"]), ITEMS)


def test_per_cell_mcnemar_and_pooled_paired_difference_match_independent_computations(run_dir):
    rng = np.random.default_rng(1)
    text = {s: list((rng.random(ITEMS) < 0.3).astype(int)) for s in ("target_text", "source_text", "token_budget")}
    cells = {seed: planted(rng, 0.6, 0.1, text) for seed in (1, 2)}
    rows = [write_cell(run_dir, "k8", seed, o) for seed, o in cells.items()]
    vs = item_statistics(run_dir, rows, ["k8"])["k8"]["bridged_vs"]
    for other in ("zero_prefix", "target_text"):
        for cell in vs[other]["cells"]:
            b, c = np.array(cells[cell["seed"]]["bridged"]), np.array(cells[cell["seed"]][other])
            better, worse = int(((b == 1) & (c == 0)).sum()), int(((b == 0) & (c == 1)).sum())
            assert (cell["better"], cell["worse"]) == (better, worse)
            assert cell["p_value"] == pytest.approx(scipy_stats.binomtest(min(better, worse), better + worse).pvalue)
        per_item = (np.mean([cells[s]["bridged"] for s in (1, 2)], axis=0) -
                    np.mean([cells[s][other] for s in (1, 2)], axis=0))
        assert vs[other]["difference"] == pytest.approx(per_item.mean())
        assert vs[other]["ci95"][0] > 0 and vs[other]["p_value"] < 0.01  # a planted +0.3..0.5 gain
    assert vs["target_text"]["shared"] and not vs["zero_prefix"]["shared"]
    line = next(x for x in _bridge_section({"k8": item_statistics(run_dir, rows, ["k8"])["k8"]}, ["k8"])
                if x.startswith("| k8 |"))
    assert "| yes | 2/2 |" in line


def test_a_planted_null_is_not_reported_as_crossing_the_bridge(run_dir):
    rng = np.random.default_rng(2)
    text = {s: list((rng.random(ITEMS) < 0.3).astype(int)) for s in ("target_text", "source_text", "token_budget")}
    rows = [write_cell(run_dir, "k8", seed, planted(rng, 0.2, 0.2, text)) for seed in (1, 2, 3)]
    items = item_statistics(run_dir, rows, ["k8"])
    assert items["k8"]["bridged_vs"]["zero_prefix"]["ci95"][0] <= 0
    section = "\n".join(_bridge_section(items, ["k8"]))
    assert "| no |" in section and "Not shown to cross" in section and "Information crossed the bridge (" not in section


def test_the_sign_flip_p_value_approximates_the_exact_permutation_test():
    rng = np.random.default_rng(3)
    first = (rng.random((2, 12)) < 0.6).astype(int)
    second = (rng.random((2, 12)) < 0.4).astype(int)
    result = stats.paired_item_difference(first, second, resamples=20_000)
    d = first.mean(0) - second.mean(0)
    exact = np.mean([abs(np.dot(signs, d)) >= abs(d.sum()) - 1e-12
                     for signs in itertools.product((-1, 1), repeat=d.size)])
    assert result["p_value"] == pytest.approx(exact, abs=0.015)
    assert result["ci95"][0] <= result["difference"] <= result["ci95"][1]
    same = stats.paired_item_difference(first, first)
    assert same["difference"] == 0 and same["p_value"] == 1.0


@pytest.mark.parametrize(("better", "worse"), [(0, 0), (5, 0), (7, 3), (20, 31)])
def test_mcnemar_exact_is_the_binomial_test_on_discordant_pairs(better, worse):
    expected = 1.0 if better + worse == 0 else scipy_stats.binomtest(better, better + worse, 0.5).pvalue
    assert stats.mcnemar_exact(better, worse) == pytest.approx(expected)


def test_a_shared_measurement_reads_as_such_never_p_zero():
    # token_budget per K is one evaluation shared by all seeds: the same "change" on every seed
    change = stats.paired_relative_change({1: 0.25, 2: 0.25, 3: 0.25}, {1: 0.2, 2: 0.2, 3: 0.2})
    assert change["constant"] and change["p_value"] is None and change["ci95"] is None
    from lmlab.studies.report import change_cell
    assert change_cell(change) == "+25.00% (one shared measurement, no interval)"
