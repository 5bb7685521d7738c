"""The LatentWire study: early stopping through the recipe, the arms, the shared text systems, and whole
runs through the real CLI (the smoke preset, and the paper preset on local model directories and a local
GSM8K-format JSONL data set)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from helpers import assert_run_layout, read_jsonl, run_smoke_study, save_tiny_model
from lmlab.cli import main
from lmlab.config import load_config, preset_path
from lmlab.data import generators
from lmlab.engine.train import TrainConfig
from lmlab.errors import ConfigError
from lmlab.latentwire.bridge import LatentWireBridge, PromptEncoder, build_translator
from lmlab.latentwire.evaluate import METRICS, SYSTEMS, evaluate_latentwire
from lmlab.latentwire.gsm8k import GSM8KPrompt, gold_answer
from lmlab.latentwire.losses import LossWeights, answer_nll
from lmlab.latentwire.translator import translator_preset
from lmlab.models.hf import load_causal_lm, load_tokenizer
from lmlab.stats import wilson_interval
from lmlab.studies import latentwire_study
from lmlab.studies.latentwire_study import (
    BRIDGE_SYSTEMS,
    TEXT_SYSTEMS,
    LatentWireStudyConfig,
    _baselines_section,
    _bridge_section,
    _compression_plot,
    collapse_check,
    configuration_statistics,
    fall_noise,
    fixes_without_collapse,
    latentwire_claims,
    latentwire_comparisons,
    merge_evaluations,
    reference_and_candidate,
    second_half_gain,
    study_arms,
    train_translator,
    validation_run,
)
from lmlab.studies.pretrain import tokenizer_texts
from lmlab.studies.rundir import RunDir

pytestmark = [pytest.mark.xdist_group("studies"), pytest.mark.usefixtures("one_thread")]

K = 4
ITEMS = generators.arithmetic_problems("train", 40, seed=3)
EVAL_ITEMS = generators.arithmetic_problems("test", 6, seed=3)
VOLATILE = ("latency_s", "tokens_per_s")  # wall-clock measurements differ between two runs of a system


def save_arithmetic_model(directory: Path, arch: str, vocab_size: int, tokenizer_seed: int, **sizes) -> Path:
    """A freshly initialised tiny model and its own BPE tokenizer (trained on arithmetic problems)."""
    return save_tiny_model(directory, arch, texts=tokenizer_texts("arithmetic", n=300, seed=tokenizer_seed),
                           vocab_size=vocab_size, seed=tokenizer_seed, context=256, **sizes)


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory) -> Path:
    """GPT-2-style source: width 48, its own byte-level BPE of 320 tokens."""
    return save_arithmetic_model(tmp_path_factory.mktemp("source"), "gpt2", 320, 1, hidden_size=48)


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory) -> Path:
    """Llama-style target with grouped-query attention: width 64, a different BPE of 300 tokens."""
    return save_arithmetic_model(tmp_path_factory.mktemp("target"), "llama", 300, 2, hidden_size=64, num_kv_heads=2)


def make_bridge(gpt2_dir: Path, llama_dir: Path, seed: int = 0) -> LatentWireBridge:
    source, target = load_causal_lm(str(gpt2_dir)), load_causal_lm(str(llama_dir))
    encoder = PromptEncoder(load_tokenizer(str(gpt2_dir)), load_tokenizer(str(llama_dir)), GSM8KPrompt(),
                            "soft_only", K)
    torch.manual_seed(seed)
    translator = build_translator(source, target, translator_preset(K, bottleneck=32, depth=1, heads=4))
    return LatentWireBridge(source, target, translator, encoder)


def translator_state(bridge: LatentWireBridge) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in bridge.translator.named_parameters()}


def scripted_evaluation(scores: list[float], snapshots: list[dict]):
    """An evaluation that reports the given scores in turn and records the translator weights it saw."""
    remaining = iter(scores)

    def evaluate(bridge):
        snapshots.append(translator_state(bridge))
        return {"val_acc": next(remaining)}

    return evaluate


def same_weights(a: dict, b: dict) -> bool:
    return all(torch.equal(a[name], b[name]) for name in a)


SCORES = [0.10, 0.50, 0.20, 0.30, 0.25, 0.20]  # the best evaluation is the second one
STEPS_CFG = TrainConfig(epochs=1, batch_size=4, lr=1e-2, warmup_ratio=0.0, eval_every=1, early_stopping_patience=3,
                        log_every=1)


def train_scripted(source_dir: Path, target_dir: Path, metrics_path: Path, *, fixes: bool, info_nce_start: int):
    """Train a fresh bridge whose evaluations return SCORES: (bridge, result, weights at each evaluation)."""
    bridge = make_bridge(source_dir, target_dir)
    snapshots: list[dict] = []
    result = train_translator(bridge, ITEMS[:24], ITEMS[24:], STEPS_CFG, LossWeights(info_nce_start=info_nce_start),
                              seed=0, stability_fixes=fixes, evaluate=scripted_evaluation(SCORES, snapshots),
                              metrics_path=metrics_path)
    return bridge, result, snapshots


def test_early_stopping_restores_the_best_evaluations_translator_weights(source_dir, target_dir, tmp_path):
    bridge, result, snapshots = train_scripted(source_dir, target_dir, tmp_path / "metrics.jsonl", fixes=True,
                                               info_nce_start=2)
    # Three evaluations without improvement after step 2: training stops at step 5 of 6.
    assert result.stopped_early and result.steps == 5 and len(snapshots) == 5
    assert result.best["step"] == 2 and result.best["val_acc"] == 0.5
    final = translator_state(bridge)
    assert same_weights(final, snapshots[1])
    assert not same_weights(final, snapshots[-1])  # the weights did move after the best evaluation
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [("info_nce" in r) for r in train_records] == [False, False, True, True, True]  # InfoNCE from step 2


def test_without_the_fixes_training_keeps_the_last_weights_and_no_infonce(source_dir, target_dir, tmp_path):
    bridge, result, snapshots = train_scripted(source_dir, target_dir, tmp_path / "metrics.jsonl", fixes=False,
                                               info_nce_start=0)
    assert not result.stopped_early and result.steps == 6 and len(snapshots) == 6
    final = translator_state(bridge)
    assert same_weights(final, snapshots[-1]) and not same_weights(final, snapshots[1])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_acc"] for r in records if r["kind"] == "eval"] == SCORES  # the curve is still recorded
    assert not any("info_nce" in r for r in records)


def test_validation_run_adds_accuracy_and_an_unbatched_nll(source_dir, target_dir):
    bridge = make_bridge(source_dir, target_dir).eval()
    items = ITEMS[:5]
    got = validation_run(bridge, items, batch_size=2, max_new_tokens=6)
    assert got.metrics["val_acc"] == got.metrics["bridged/acc_flexible"] == pytest.approx(
        sum(s["systems"]["bridged"]["correct_flexible"] for s in got.samples) / len(items))
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for item in items:  # one item at a time: no padding anywhere
            out = bridge(bridge.encoder([item]))
            item_nll, item_tokens = answer_nll(out.logits, out.labels)
            nll, tokens = nll + float(item_nll), tokens + int(item_tokens)
    assert tokens == sum(len(bridge.encoder.answer_ids(item)) for item in items)
    assert got.metrics["val_nll"] == pytest.approx(nll / tokens, rel=1e-5)


def test_each_training_evaluation_writes_its_samples(source_dir, target_dir, tmp_path):
    bridge = make_bridge(source_dir, target_dir)
    cfg = TrainConfig(epochs=1, batch_size=4, lr=1e-2, warmup_ratio=0.0, eval_every=2, log_every=1)
    result = train_translator(bridge, ITEMS[:12], ITEMS[12:15], cfg, LossWeights(), seed=0, stability_fixes=True,
                              val_max_new_tokens=4, samples_dir=tmp_path / "validation",
                              metrics_path=tmp_path / "metrics.jsonl")
    files = sorted(p.name for p in (tmp_path / "validation").iterdir())
    assert files == ["eval_samples_step2.jsonl", "eval_samples_step3.jsonl"]  # every 2 steps and the last one
    evals = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "eval"]
    for name, record in zip(files, evals, strict=True):
        samples = read_jsonl(tmp_path / "validation" / name)
        assert [s["question"] for s in samples] == [it["question"] for it in ITEMS[12:15]]
        correct = sum(s["systems"]["bridged"]["correct_flexible"] for s in samples)
        assert record["val_acc"] == pytest.approx(correct / 3)
    assert result.best["val_acc"] == max(r["val_acc"] for r in evals)


def test_shared_text_systems_merge_into_the_full_evaluation(source_dir, target_dir):
    bridge = make_bridge(source_dir, target_dir).eval()
    run = dict(batch_size=3, max_new_tokens=6)
    parts = [evaluate_latentwire(bridge, EVAL_ITEMS, systems=(s,), **run) for s in TEXT_SYSTEMS]
    merged = merge_evaluations([*parts, evaluate_latentwire(bridge, EVAL_ITEMS, systems=BRIDGE_SYSTEMS, **run)])
    direct = evaluate_latentwire(bridge, EVAL_ITEMS, **run)
    assert set(merged.metrics) == set(direct.metrics) == {f"{s}/{m}" for s in SYSTEMS for m in METRICS}
    for key, value in direct.metrics.items():
        if not key.endswith(VOLATILE):
            assert merged.metrics[key] == pytest.approx(value), key
    assert merged.samples == direct.samples
    assert [list(s["systems"]) for s in merged.samples] == [list(SYSTEMS)] * len(EVAL_ITEMS)


# ---------------------------------------------------------------------------------------------------
# Arms and configuration


def study_config(*overrides: str) -> LatentWireStudyConfig:
    return load_config(LatentWireStudyConfig, preset_path("latentwire", "default"), list(overrides))


def test_default_arms_share_the_k16_stable_cell_and_decide_on_stability():
    cfg = study_config()
    arms = study_arms(cfg)
    assert list(arms) == ["stable_k8", "stable_k12", "stable_k16", "baseline_k16"]
    assert [(a.num_queries, a.fixes) for a in arms.values()] == [(8, True), (12, True), (16, True), (16, False)]
    assert reference_and_candidate(cfg) == ("baseline_k16", "stable_k16")


@pytest.mark.parametrize(("ablation", "arms", "pair"), [
    ("compression", ["stable_k8", "stable_k12", "stable_k16"], ("stable_k16", "stable_k8")),
    ("mode", ["stable_k16", "stable_k16_soft_plus_text"], ("stable_k16_soft_plus_text", "stable_k16")),
    ("swap,mode", ["stable_k16", "stable_k16_swapped", "stable_k16_soft_plus_text"],
     ("stable_k16_soft_plus_text", "stable_k16")),
    ("[swap]", ["stable_k16", "stable_k16_swapped"], ("stable_k16", "stable_k16_swapped")),
])
def test_each_ablation_has_its_arms_and_reference(ablation, arms, pair):
    cfg = study_config(f"ablation={ablation}")
    assert list(study_arms(cfg)) == arms
    assert reference_and_candidate(cfg) == pair


def test_each_comparison_changes_one_factor_and_the_decision_pair_is_the_headline():
    cfg = study_config()
    specs = {(c["candidate"], c["parent"]): c["headline"] for c in latentwire_comparisons(cfg)}
    # K against the largest K with the fixes on in both; the fixes at one K: never K and the fixes at once
    assert specs == {("stable_k16", "baseline_k16"): True, ("stable_k8", "stable_k16"): False,
                     ("stable_k12", "stable_k16"): False}
    cfg = study_config("ablation=[swap,mode]")
    assert {(c["candidate"], c["parent"]) for c in latentwire_comparisons(cfg)} == {
        ("stable_k16_swapped", "stable_k16"), ("stable_k16", "stable_k16_soft_plus_text")}


def _curves(values_by_seed: dict[int, list[float]], every: int = 150) -> dict[int, dict[int, float]]:
    """{seed: {step: val_acc}} with an evaluation every `every` steps."""
    return {seed: {every * (i + 1): v for i, v in enumerate(values)} for seed, values in values_by_seed.items()}


def _claims(curves: dict, patience: int = 5, num_val: int = 96) -> dict[str, str]:
    cfg = {"num_queries": 16, "mode": "soft_only", "compression_k": [8, 16], "ablation": ["compression", "stability"],
           "num_val": num_val, "train": {"early_stopping_patience": patience}}
    values = {"stable_k16": {"bridged/acc_flexible": {1: 0.2, 2: 0.18, 3: 0.19}},
              "stable_k8": {"bridged/acc_flexible": {1: 0.15, 2: 0.17, 3: 0.12}},
              "baseline_k16": {"bridged/acc_flexible": {1: 0.19, 2: 0.17, 3: 0.2}}}
    claims = latentwire_claims(cfg, {}, values, {"configs": {}}, curves)
    return {c["id"]: c["verdict"] for c in claims}


def _l2(curves: dict, patience: int = 5, num_val: int = 96) -> str:
    return _claims({"baseline_k16": _curves(curves)}, patience, num_val)["L2"]


def test_the_collapse_claim_is_untestable_where_the_baseline_did_not_collapse():
    rising = {1: [0.05, 0.1, 0.15, 0.2, 0.21, 0.22], 2: [0.03, 0.08, 0.1, 0.15, 0.16, 0.17]}
    verdict = _l2(rising)
    assert verdict.startswith("not testable here: `baseline_k16` did not collapse - its validation accuracy was at its "
                              "peak at its last evaluation on every seed (2 of 2)")
    assert "early stopping could not end a run early either (patience 5 with 6 evaluations)" in verdict
    assert "could not end a run early" not in _l2(rising, patience=2)
    # a baseline that peaks and falls back far: the verdict is the interval's, with how far it fell
    collapsing = {1: [0.05, 0.3, 0.35, 0.2, 0.15, 0.1], 2: rising[2]}
    verdict = _l2(collapsing, patience=2)
    assert not verdict.startswith("not testable here") and "fell from its peak to its last evaluation by more than " \
        "the sampling noise of 96 validation items on 1 of 2 seeds (by up to 0.250)" in verdict
    check = collapse_check(_curves(collapsing), 2, 96)
    assert check["drops"] == pytest.approx({1: 0.25, 2: 0.0}) and check["can_stop_early"]
    assert (check["fell"], check["collapsed"]) == (1, 1)


def test_a_fall_within_the_validation_items_noise_is_not_a_collapse():
    # 0.35 -> 0.30 on 96 items: a Wald 95% bound of the difference of two such accuracies is 1.96 * sqrt((0.35 *
    # 0.65 + 0.3 * 0.7) / 96) = 0.1325; the fall of 0.05 is below it, 0.15 is above
    assert fall_noise(0.35, 0.3, 96) == pytest.approx(1.959964 * ((0.35 * 0.65 + 0.3 * 0.7) / 96) ** 0.5, rel=1e-6)
    small = {1: [0.1, 0.2, 0.35, 0.3], 2: [0.1, 0.2, 0.3, 0.3]}
    verdict = _l2(small)
    assert verdict.startswith("not testable here: `baseline_k16` did not collapse - its validation accuracy fell from "
                              "its peak to its last evaluation on 1 of 2 seeds, by at most 0.050, within the sampling "
                              "noise of 96 validation items")
    check = collapse_check(_curves(small), 5, 96)
    assert (check["fell"], check["collapsed"]) == (1, 0)
    # the same fall on 20x the items stands out: 0.1325 / sqrt(20) = 0.030 < 0.05
    assert collapse_check(_curves(small), 5, 1920)["collapsed"] == 1
    assert not _l2(small, num_val=1920).startswith("not testable here")


def test_the_fixes_sentences_say_when_their_baseline_did_not_collapse():
    cfg = {"num_queries": 16, "mode": "soft_only", "num_val": 96, "train": {"early_stopping_patience": 5}}
    summary = {"decision": {"candidate": "stable_k16", "reference": "baseline_k16", "text": "D."},
               "comparisons": [{"candidate": "stable_k16", "parent": "baseline_k16", "text": "S."},
                               {"candidate": "stable_k8", "parent": "stable_k16", "text": "K."}]}
    rising = {"baseline_k16": _curves({1: [0.1, 0.2, 0.3], 2: [0.1, 0.25, 0.3]})}
    out = fixes_without_collapse(summary, cfg, rising)
    note = (" `baseline_k16` did not collapse in this run (claim L2 below), so the fixes had no collapse to prevent: "
            "this measures what they do to a run that does not collapse.")
    assert out["decision"]["text"] == "D." + note
    assert [c["text"] for c in out["comparisons"]] == ["S." + note, "K."]  # the K comparison is left alone
    assert summary["decision"]["text"] == "D."  # the summary it read is not changed in place
    # with the cells: the change in points of accuracy (the relative change is of an accuracy) and what the fixes did
    rows = [{"config": c, "seed": seed, "status": "ok", "details": {"stopped_early": False},
             "metrics": {"bridged/acc_flexible": acc, "train_steps": 100, "best_step": 100}}
            for c, accs in (("stable_k16", (0.30, 0.34)), ("baseline_k16", (0.35, 0.34))) for seed, acc in
            zip((1, 2), accs, strict=True)]
    text = fixes_without_collapse({**summary, "primary_metric": "bridged/acc_flexible"}, cfg, rising,
                                  rows)["decision"]["text"]
    assert text.startswith("D." + note + " In points of accuracy: -2.5 (mean over 2 seeds of `stable_k16` - "
                           "`baseline_k16`). What the fixes did in `stable_k16`: early stopping ended 0 of 2 runs")
    assert text.endswith("so of the three fixes only InfoNCE acted.")
    collapsed = {"baseline_k16": _curves({1: [0.1, 0.6, 0.1], 2: [0.1, 0.25, 0.3]})}
    assert fixes_without_collapse(summary, cfg, collapsed) == {}
    assert fixes_without_collapse(summary, cfg, {}) == {}  # no curves: nothing to say


def test_second_half_gain_is_the_paired_change_from_the_middle_evaluation_to_the_last():
    curves = _curves({1: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5], 2: [0.0, 0.1, 0.1, 0.2, 0.3, 0.3],
                      3: [0.1, 0.1, 0.2, 0.2, 0.3, 0.45]})
    gain = second_half_gain(curves)
    # half of the last step (900) is 450: from step 450 to step 900, per seed 0.3, 0.2, 0.25
    assert (gain["middle"], gain["last"], gain["seeds"]) == (450, 900, 3)
    assert gain["mean"] == pytest.approx(0.25)
    half = scipy_stats.t.ppf(0.975, 2) * 0.05 / 3 ** 0.5  # the per-seed gains' sd is 0.05
    assert gain["ci95"] == pytest.approx([0.25 - half, 0.25 + half])
    # only the steps every seed evaluated count (a seed stopped early has fewer)
    short = {**curves, 4: {150: 0.1, 300: 0.2, 450: 0.3}}
    assert second_half_gain(short)["last"] == 450 and second_half_gain({1: {150: 0.1}}) is None


def test_the_compression_claim_says_whether_its_arms_were_still_improving():
    rising = {1: [0.0, 0.05, 0.1, 0.15, 0.2, 0.25], 2: [0.0, 0.04, 0.08, 0.14, 0.19, 0.22],
              3: [0.01, 0.05, 0.1, 0.16, 0.21, 0.26]}
    flat = {1: [0.1, 0.2, 0.2, 0.25, 0.2, 0.22], 2: [0.1, 0.2, 0.22, 0.18, 0.2, 0.2],
            3: [0.1, 0.2, 0.2, 0.21, 0.24, 0.19]}
    both = _claims({"stable_k8": _curves(rising), "stable_k16": _curves(rising)})["L3"]
    assert "; both arms still improved significantly over the second half of training (bridged validation accuracy " \
           "from step 450 to step 900, paired over 3 seeds: `stable_k8` +15.0 [+12.5, +17.5], `stable_k16` +15.0 " \
           "[+12.5, +17.5] percentage points)" in both
    assert both.endswith("so more training might change this comparison: it compares K at this training budget, not "
                         "what K soft tokens can carry once trained")
    one = _claims({"stable_k8": _curves(flat), "stable_k16": _curves(rising)})["L3"]
    assert "; `stable_k16` still improved significantly over the second half of training" in one
    neither = _claims({"stable_k8": _curves(flat), "stable_k16": _curves(flat)})["L3"]
    assert "; neither arm improved significantly over the second half of training" in neither
    assert "more training might change" not in neither
    assert "training" not in _claims({})["L3"]  # no curves: no clause
    # the planted k8 vs k16 interval holds both 0 and the claimed size, which the verdict names with the K compared
    assert _claims({})["L3"].startswith("not testable at this scale: the interval holds both 0 and the notes' -26.7% "
                                        "(55% at 32 soft tokens vs 75% at 64; this run compares 8 with 16)")


def planted_items(accuracy: dict[str, float], items: int = 200, seeds: int = 3) -> dict:
    """`configuration_statistics` of planted outcomes: each system right on accuracy x items items drawn at random
    (a fixed draw), per seed for a bridge system, once for a text system (one evaluation shared by the seeds)."""
    rng = np.random.default_rng(7)

    def row(acc: float) -> list[int]:
        return list((rng.permutation(items) < round(acc * items)).astype(int))

    outcomes = {s: np.array([row(a) for _ in range(1 if s in TEXT_SYSTEMS else seeds)]) for s, a in accuracy.items()}
    return {"stable_k16": configuration_statistics(outcomes, {}, list(range(1, seeds + 1)))}


def planted_claims(items: dict) -> dict[str, dict]:
    cfg = {"num_queries": 16, "mode": "soft_only", "compression_k": [16], "ablation": ["stability"], "num_val": 96,
           "train": {"early_stopping_patience": 5}}
    return {c["id"]: c for c in latentwire_claims(cfg, items, {}, {"configs": {}})}


CONTROLS = {"zero_prefix": 0.01, "shuffled_source": 0.02, "token_budget": 0.02}


def test_accuracy_differences_read_in_percentage_points():
    items = planted_items({"bridged": 0.555, "target_text": 0.47, "source_text": 0.3, **CONTROLS})
    claims = planted_claims(items)
    test = items["stable_k16"]["bridged_vs"]["target_text"]
    low, high = (100 * b for b in test["ci95"])
    assert claims["L1"]["measured"] == (f"`stable_k16` bridged - target_text {100 * test['difference']:+.1f} "
                                        f"[{low:+.1f}, {high:+.1f}] percentage points (p = {test['p_value']:.2g}; "
                                        "200 items x 3 seeds)")
    # the claimed +8.5 points is compared with the interval in the same unit: inside it here (about +3 to +14)
    assert 0 < low < 8.5 < high
    verdict = claims["L1"]["verdict"]
    assert verdict.startswith("supported") and "holds the claimed +8.5 percentage points" in verdict
    far = planted_claims(planted_items({"bridged": 0.95, "target_text": 0.47, "source_text": 0.3, **CONTROLS}))
    assert far["L1"]["verdict"].startswith("supported") and "the claimed +8.5 percentage points" in far["L1"]["verdict"]
    assert "holds" not in far["L1"]["verdict"]  # +48 points: beyond the claimed size
    tables = "\n".join(_bridge_section(items, ["stable_k16"]) + _baselines_section(items, ["stable_k16"]))
    zero = items["stable_k16"]["bridged_vs"]["zero_prefix"]
    assert f"| {100 * zero['difference']:+.1f} [{100 * zero['ci95'][0]:+.1f}, " in tables
    assert "accuracy points" not in tables + str(claims)
    assert tables.count("in percentage points of accuracy") == 2


def test_between_claim_says_above_the_source_is_trivial_where_the_source_is_at_the_floor():
    # the run's setting: the source reads the text barely better than the controls that carry nothing
    weak_items = planted_items({"bridged": 0.325, "target_text": 0.47, "source_text": 0.06, **CONTROLS})
    weak = planted_claims(weak_items)
    assert weak["L5"]["measured"].startswith("bridged - source_text +26.")
    assert weak["L5"]["verdict"].startswith(
        'not testable at this scale: bridged is significantly below the target, but "above the source" is trivially '
        "met - the source barely solves the task here: source_text 0.060 [0.035, 0.102] (shared), unlike the notes' "
        "source at 0.540, is at most ")
    bound = 100 * max(t["ci95"][1] for t in weak_items["stable_k16"]["source_vs"].values())
    assert bound < 10 and (f"is at most {bound:.1f} points above the controls that carry nothing about the item (the "
                           "upper ends of its paired 95% intervals) - its 95% interval overlaps zero_prefix's 0.010 "
                           "[0.003, 0.036] and shuffled_source's 0.020 [0.008, 0.050]; paired per item it differs by "
                           ) in weak["L5"]["verdict"]
    # the source's own paired difference from each floor control: the mean over items of source minus the
    # control's per-item accuracy averaged over seeds, computed here from the planted rows
    vs = weak_items["stable_k16"]["source_vs"]
    for control, planted in (("zero_prefix", 0.01), ("shuffled_source", 0.02)):
        assert vs[control]["difference"] == pytest.approx(0.06 - planted)
        t = vs[control]
        low, high = (100 * b for b in t["ci95"])
        assert f"{100 * t['difference']:+.1f} [{low:+.1f}, {high:+.1f}] points vs {control}" in weak["L5"]["verdict"]
    # where the bootstrap interval and the permutation test disagree, the clause says the difference is marginal
    from lmlab.studies.latentwire_study import source_at_floor

    entry = weak_items["stable_k16"]
    marginal = {**entry, "source_vs": {**entry["source_vs"], "shuffled_source": {
        **entry["source_vs"]["shuffled_source"], "difference": 0.038, "ci95": [0.002, 0.077], "p_value": 0.056}}}
    assert ("+3.8 [+0.2, +7.7] points vs shuffled_source (p = 0.056, marginal: the bootstrap interval excludes 0 "
            "while the permutation test's p is above 0.05)") in source_at_floor(marginal)
    agree = {**entry, "source_vs": {**entry["source_vs"], "shuffled_source": {
        **entry["source_vs"]["shuffled_source"], "difference": 0.01, "ci95": [-0.02, 0.04], "p_value": 0.5}}}
    assert "+1.0 [-2.0, +4.0] points vs shuffled_source (p = 0.5, not significant)" in source_at_floor(agree)
    # overlapping accuracy intervals over few items are no floor where the paired difference reaches 10 points
    wide = {**entry, "source_vs": {**entry["source_vs"], "zero_prefix": {
        **entry["source_vs"]["zero_prefix"], "difference": 0.167, "ci95": [0.042, 0.283], "p_value": 0.019}}}
    assert source_at_floor(wide) is None
    # the source at the floor and bridged with it: an interval holds 0, and the verdict still says why
    floor = planted_claims(planted_items({"bridged": 0.05, "target_text": 0.47, "source_text": 0.06, **CONTROLS}))
    assert floor["L5"]["verdict"].startswith("not testable at this scale: an interval holds 0; the source barely "
                                             "solves the task here")
    # the notes' setting: a source that clearly solves the task (its interval clear of the controls')
    capable = planted_claims(planted_items({"bridged": 0.645, "target_text": 0.77, "source_text": 0.54,
                                            **CONTROLS}))
    assert capable["L5"]["verdict"].startswith("supported: bridged is significantly above the source and below the "
                                               "target; the peak-to-final drop cannot show in `stable_k")
    assert capable["L5"]["verdict"].endswith("`: it restores its best-validation weights (L2 reads the drop in the "
                                             "arms without the fixes)")
    outside = planted_claims(planted_items({"bridged": 0.02, "target_text": 0.77, "source_text": 0.54, **CONTROLS}))
    assert outside["L5"]["verdict"].startswith("not supported: bridged is significantly outside the source-target "
                                               "range")
    # L1 (bridged above the target reading the text) needs the source to add what the target lacks: with the source
    # at the floor that cannot show, so a shortfall is not testable here; with a capable source it stands
    assert weak["L1"]["verdict"].startswith("not testable at this scale: the source barely solves the task here")
    assert "the interval alone reads: not supported: significantly worse, against the claim" in weak["L1"]["verdict"]
    assert outside["L1"]["verdict"] == "not supported: significantly worse, against the claim"


def test_the_stability_verdict_says_which_fixes_acted():
    from lmlab.studies.latentwire_study import fixes_acted

    def cell(seed: int, best: int, stopped: bool = False) -> dict:
        return {"config": "stable_k16", "seed": seed, "status": "ok", "details": {"stopped_early": stopped},
                "metrics": {"best_step": best, "train_steps": 1800 if not stopped else best + 500}}

    assert fixes_acted([cell(1, 1800), cell(2, 1800)], "stable_k16").endswith(
        "early stopping ended 0 of 2 runs early; restoring the best weights went back to an earlier evaluation in 0 "
        "of 2, so of the three fixes only InfoNCE acted")
    said = fixes_acted([cell(1, 1500), cell(2, 1800), cell(3, 900, stopped=True)], "stable_k16")
    assert "ended 1 of 3 runs early" in said and "in 2 of 3 (by up to 500 steps;" in said and "only" not in said
    assert fixes_acted([], "stable_k16") == ""


def test_bad_ablation_and_missing_translator_size_are_config_errors():
    with pytest.raises(ConfigError, match="ablation"):
        study_config("ablation=compresion")
    with pytest.raises(ConfigError, match="no translator size for K=20"):
        study_config("compression_k=[8, 20]")
    cfg = study_config("compression_k=[32, 64]", "ablation=compression")  # the notes' presets need no size
    assert list(study_arms(cfg)) == ["stable_k32", "stable_k64"]


# ---------------------------------------------------------------------------------------------------
# Whole runs through the CLI


def parse_summary_table(text: str) -> dict[str, dict]:
    lines = text.strip().splitlines()
    assert lines[0].split() == ["system", "total", "valid", "invalid", "accuracy", "evaluations"]
    assert lines[-1].startswith("(each distinct evaluation counted once")
    return {name: {"total": int(t), "valid": int(v), "invalid": int(i), "accuracy": float(a), "evaluations": int(e)}
            for name, t, v, i, a, e in (line.split() for line in lines[1:-1])}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    return run_smoke_study(tmp_path_factory.mktemp("latentwire"), "latentwire")


def test_smoke_run_layout_and_result_metrics(smoke_run: Path):
    assert_run_layout(smoke_run, ["accuracy_vs_compression.png", "bridged_accuracy_over_training.png",
                                  "training_curves.png"])
    rows = read_jsonl(smoke_run / "results.jsonl")
    configs = ["stable_k4", "stable_k8", "baseline_k8"]
    assert sorted((r["config"], r["seed"]) for r in rows) == sorted((c, s) for c in configs for s in (42, 123))
    for r in rows:
        assert r["status"] == "ok" and r["error"] is None, r.get("error")
        cell = smoke_run / "cells" / r["config"] / f"seed-{r['seed']}"
        for name in ("config.json", "metrics.jsonl", "eval_samples.jsonl"):
            assert (cell / name).is_file(), (cell, name)
        evals = [m for m in read_jsonl(cell / "metrics.jsonl") if m["kind"] == "eval"]
        assert evals and all(0.0 <= m["val_acc"] <= 1.0 for m in evals)
        validation = sorted(p.name for p in (cell / "validation").glob("eval_samples_step*.jsonl"))
        assert validation == sorted(f"eval_samples_step{m['step']}.jsonl" for m in evals)
        samples = read_jsonl(cell / "eval_samples.jsonl")
        n = len(samples)
        assert [s["index"] for s in samples] == list(range(n)) and n == r["details"]["eval_items"]
        for system in SYSTEMS:
            for metric in ("acc_strict", "acc_flexible", "invalid_rate", "prompt_tokens", "kv_bytes", "latency_s"):
                assert isinstance(r["metrics"][f"{system}/{metric}"], (int, float)), (system, metric)
            records = [s["systems"][system] for s in samples]
            assert all(rec["correct_flexible"] == (rec["flexible"] == s["gold"]) for rec, s in zip(records, samples,
                                                                                                     strict=True))
            correct = sum(rec["correct_flexible"] for rec in records)
            assert r["metrics"][f"{system}/acc_flexible"] == pytest.approx(correct / n)
            assert r["metrics"][f"{system}/acc_strict"] == pytest.approx(
                sum(rec["correct_strict"] for rec in records) / n)
            assert r["metrics"][f"{system}/invalid_rate"] == pytest.approx(
                sum(rec["flexible"] is None for rec in records) / n)
            assert r["metrics"][f"{system}/acc_flexible_wilson95"] == pytest.approx(wilson_interval(correct, n))
        cue = load_tokenizer(r["details"]["setup"]["target"])("\nAnswer:", add_special_tokens=False)["input_ids"]
        assert r["metrics"]["bridged/prompt_tokens"] == 1 + r["details"]["arm"]["num_queries"] + len(cue)  # BOS K cue
        assert r["params"]["trainable_params"] > 0


def test_smoke_summary_follows_the_contract(smoke_run: Path):
    summary = json.loads((smoke_run / "summary.json").read_text())
    rows = read_jsonl(smoke_run / "results.jsonl")
    assert summary["study"] == "latentwire" and summary["preset"] == "smoke"
    assert summary["reference"] == "baseline_k8" and summary["seeds"] == [42, 123]
    assert summary["primary_metric"] == "bridged/acc_flexible"
    assert summary["decision"]["scenario"] in {"A", "B", "C", "D", "not-significant"} and summary["decision"]["text"]
    assert summary["failed_cells"] == []
    for name, entry in summary["configs"].items():
        assert entry["n_ok"] == 2 and entry["n_failed"] == 0 and entry["trainable_params"] > 0
        values = [r["metrics"]["bridged/acc_flexible"] for r in rows if r["config"] == name]
        described = entry["metrics"]["bridged/acc_flexible"]
        assert described["values"] == values and described["mean"] == pytest.approx(sum(values) / 2)
        assert set(entry["vs_reference"]) <= set(entry["metrics"])
        for change in entry["vs_reference"].values():
            assert {"delta_pct", "ci95", "p_value"} <= set(change)
    assert summary["configs"]["stable_k8"]["vs_reference"]["bridged/compression"]["delta_pct"] == pytest.approx(0.0)
    report = (smoke_run / "report.md").read_text()
    assert report.splitlines()[0] == "# latentwire study (smoke preset): a pipeline check, not evidence"
    if all(r["metrics"]["bridged/acc_flexible"] == 0 for r in rows if r["config"] == "baseline_k8"):
        undefined = "undefined because `baseline_k8`'s bridged/acc_flexible is 0 on every seed"
        assert undefined in summary["decision"]["text"]
    assert [c["id"] for c in summary["claims"]] == ["L1", "L2", "L3", "L4", "L5", "L6"]
    assert all(c["verdict"].split(":")[0].split(" (")[0] in {"supported", "not supported", "not testable here",
                                                             "not testable at this scale",
                                                             "partly supported"}
               for c in summary["claims"])
    items = summary["paired_items"]["stable_k8"]
    assert items["accuracy"]["target_text"]["seeds"] == 1 and items["accuracy"]["bridged"]["seeds"] == 2
    assert set(items["bridged_vs"]) == {"zero_prefix", "shuffled_source", "target_text", "source_text", "token_budget"}
    for heading in ("## Does information cross the bridge?", "## Bridged vs the text baselines", "## Every system",
                    "## Timings", "## Claims of the research notes vs this run",
                    "## Accuracy and KV cache vs compression", "## Bridged accuracy over training"):
        assert heading in report
    # the compression plot varies K over the stable arms: the section names the arms it leaves to the tables
    plotted = report.split("## Accuracy and KV cache vs compression\n\n")[1].split("\n")[0]
    left = sorted({r["config"] for r in read_jsonl(smoke_run / "results.jsonl") if r["status"] == "ok"
                   and (not r["details"]["arm"]["fixes"] or r["details"]["arm"]["swapped"])})
    assert left and all(f"`{c}`" in plotted for c in left) and "in the tables above, not in the plot" in plotted


def test_the_compression_plot_labels_the_text_baselines_by_their_prompts(smoke_run: Path, monkeypatch):
    figures = []
    monkeypatch.setattr(latentwire_study, "save_figure", lambda fig, run, name: figures.append(fig))
    rows = [r for r in read_jsonl(smoke_run / "results.jsonl") if r["status"] == "ok"]
    assert _compression_plot(rows, RunDir(smoke_run))
    labels = [t.get_text().split(" [same values as")[0] for t in figures[0].legends[0].get_texts()]
    assert labels == ["target_text (the question as text, compression 1)", "bridged (soft_only)",
                      "zero_prefix (soft_only)", "shuffled_source (soft_only)",
                      "token_budget (the question's first K tokens as text)"]


def test_summarize_eval_counts_each_distinct_evaluation_once(smoke_run: Path, capsys):
    files = sorted((smoke_run / "cells").glob("*/seed-*/eval_samples.jsonl"))
    assert len(files) == 6
    assert main(["summarize-eval", *map(str, files)]) == 0
    printed = parse_summary_table(capsys.readouterr().out)
    items = len(read_jsonl(files[0]))
    rows = read_jsonl(smoke_run / "results.jsonl")
    # The text-only systems are generated once per run (token_budget once per K) and shared by the 6 cells.
    evaluations = {"target_text": 1, "source_text": 1, "token_budget": len({r["details"]["arm"]["num_queries"]
                                                                            for r in rows}),
                   "bridged": 6, "zero_prefix": 6, "shuffled_source": 6}
    assert list(printed) == list(SYSTEMS)
    for system, n in evaluations.items():
        assert printed[system]["evaluations"] == n and printed[system]["total"] == n * items, system
    by_file = {path: read_jsonl(path) for path in files}
    for system in ("bridged", "target_text"):
        columns = [path for path in files if system == "bridged" or path == files[0]]
        correct = sum(s["systems"][system]["correct_flexible"] for path in columns for s in by_file[path])
        invalid = sum(s["systems"][system]["flexible"] is None for path in columns for s in by_file[path])
        assert printed[system]["invalid"] == invalid
        assert printed[system]["accuracy"] == pytest.approx(correct / (len(columns) * items), abs=5e-4)


def write_gsm8k_jsonl(directory: Path) -> Path:
    """A local data set in GSM8K's format: train.jsonl and test.jsonl with question/answer lines."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 40), ("test", 6)):
        items = generators.arithmetic_problems(split, n, seed=11)
        with (directory / f"{split}.jsonl").open("w", encoding="utf-8") as f:
            for item in items:
                f.write(json.dumps(item) + "\n")
    return directory


def test_paper_preset_runs_on_local_models_and_gsm8k_jsonl(source_dir, target_dir, tmp_path, capsys):
    data = write_gsm8k_jsonl(tmp_path / "gsm8k")
    out = tmp_path / "run"
    code = main([
        "run", "latentwire", "--preset", "paper", "--out", str(out), "--quiet", "--seeds", "1",
        f"source_model={source_dir}", f"target_model={target_dir}", f"dataset={data}",
        "ablation=stability", f"num_queries={K}",
        f"translators=[{{num_queries: {K}, bottleneck: 32, depth: 1, heads: 4}}]",
        "n_shot=1", "num_train=12", "num_val=4", "num_eval=4", "max_new_tokens=6", "eval_batch_size=4",
        "train.batch_size=4", "train.grad_accum=1", "train.eval_every=2", "epochs=1", "threads=1"])
    assert code == 0, capsys.readouterr().err
    record = (out / "study.yaml").read_text()
    assert "dtype: bfloat16" in record and "n_shot: 1" in record  # the paper preset, with the test's overrides
    rows = read_jsonl(out / "results.jsonl")
    assert sorted(r["config"] for r in rows) == [f"baseline_k{K}", f"stable_k{K}"]
    for r in rows:
        assert r["status"] == "ok", r["error"]
        assert r["details"]["setup"]["source"] == str(source_dir)
        samples = read_jsonl(out / "cells" / r["config"] / "seed-42" / "eval_samples.jsonl")
        test_items = read_jsonl(data / "test.jsonl")[:4]
        assert [s["question"] for s in samples] == [it["question"] for it in test_items]
        assert [s["gold"] for s in samples] == [gold_answer(it) for it in test_items]
        assert r["metrics"]["bridged/compression"] > 1.0  # a one-shot text prompt against K soft tokens


def test_a_prompt_longer_than_the_sources_positions_is_a_one_line_error(source_dir, target_dir, tmp_path,
                                                                         capsys):
    data = write_gsm8k_jsonl(tmp_path / "gsm8k")
    code = main(["run", "latentwire", "--preset", "paper", "--out", str(tmp_path / "run"), "--quiet",
                 f"source_model={source_dir}", f"target_model={target_dir}", f"dataset={data}", "n_shot=8",
                 "threads=1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "n_positions" in err and "lower n_shot" in err


def test_the_report_states_both_models_the_items_and_the_translators(smoke_run: Path):
    import yaml

    config = yaml.safe_load((smoke_run / "study.yaml").read_text())["config"]
    setting = (smoke_run / "report.md").read_text().split("## Setting\n\n")[1].split("\n\n")[0]
    for said in (f"{config['num_eval']} test items every system answers",
                 f"hidden states at layer {config['source_layer']}",
                 f"{config['target']['model']['num_layers']} layers, width {config['target']['model']['hidden_size']}",
                 f"learning rate {config['train']['lr']:g}"):
        assert said in setting, said
    translators = next(line for line in setting.splitlines() if line.startswith("- Translators ("))
    for k in config["compression_k"]:  # every K's translator is described
        assert f"K = {k}" in translators or f", {k}" in translators.split(":")[0], k


def test_the_timings_say_which_base_this_run_built_though_its_cells_found_it_cached():
    """Under --parallel the run's process builds a missing base before its workers start: every cell then records
    0 s to pretrain or find it. The base's build time against the run's start says this run built it."""
    from lmlab.studies.latentwire_study import _timing_section

    def row(config, source_s):
        info = {"val_ppl": 2.07, "steps": 238, "wall_time_s": 65.0}
        setup = {"source": "/cache/source", "target": "/cache/target", "source_pretrain_s": source_s,
                 "target_pretrain_s": 0.0, "source_load_s": 0.1, "target_load_s": 0.1,
                 "source_pretrain": {**info, "built_at": "2026-12-07T22:03:00"},
                 "target_pretrain": {**info, "built_at": "2026-12-06T10:00:00"}}
        return {"config": config, "seed": 1, "details": {"setup": setup, "stopped_early": False},
                "metrics": {"train_steps": 10, "train_time_s": 1.0, "eval_time_s": 0.5}}

    lines = _timing_section([row("a", 0.0), row("b", 66.5)], ["a", "b"], started="2026-12-07T22:01:45")
    source, target = lines[2], lines[3]
    assert "at most 66.5 s to pretrain or find in the cache" in source  # the largest over the cells
    assert "65 s when built (by this run, at 2026-12-07 22:03:00)" in source
    assert "at most 0.0 s" in target and "(at 2026-12-06 10:00:00)" in target and "by this run" not in target
