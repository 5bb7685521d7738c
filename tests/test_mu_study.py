"""The MU study: smoke and paper presets end to end through the real CLI, the best checkpoint loaded back
(its perplexity recomputed by hand), samples, red flags, out-of-memory advice, parameter matching by the
configured count, and the perplexity bands."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import read_jsonl, run_cli
from lmlab.config import load_config, preset_path
from lmlab.data import generators
from lmlab.data.tokenizer import train_bpe_tokenizer
from lmlab.errors import ConfigError
from lmlab.models.hf import load_tokenizer
from lmlab.models.tiny import TinyModelConfig, build_tiny
from lmlab.mu import DenseModel, MUModel, load_checkpoint
from lmlab.studies.mu_study import (
    MonitorConfig,
    MUStudyConfig,
    OutOfMemory,
    RedFlagMonitor,
    band_cell,
    beside_thresholds,
    documents,
    generate_samples,
    model_configs,
    out_of_memory_advice,
    ppl_band,
)
from lmlab.studies.report import regenerate
from lmlab.studies.rundir import RunDir
from lmlab.studies.runner import run_study

pytestmark = [pytest.mark.xdist_group("mu_study"), pytest.mark.usefixtures("one_thread")]

CONFIGS = ["mu-sota", "mu-simple", "dense"]
EMBEDDING_TABLES = ("tok_emb.weight", "pos_emb.weight", "head.weight")
CONTRACT_METRICS = {"val_ppl", "test_ppl", "accuracy", "val_bpb", "tokens_per_s", "params_total",
                    "params_non_embedding"}


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]


def allocate_too_much(device: str = "cpu") -> None:
    """A real allocator failure on any machine: 1 PiB, beyond the virtual address space of today's processes (4 TiB
    could be handed out by a Linux kernel that overcommits memory, and never fail) and any GPU's memory."""
    torch.empty(2**50, dtype=torch.uint8, device=device)


def study_config(run: Path) -> MUStudyConfig:
    return MUStudyConfig.model_validate(RunDir(run).read_study()["config"])


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mu-smoke") / "run"
    proc = run_cli("run", "mu", "--preset", "smoke", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    return out


def reference_ppl(model, tokenizer, docs: list[str], max_length: int, prefix_id: int) -> tuple[float, float]:
    """(perplexity, next-token accuracy) by hand, one window at a time: every document token predicted once,
    the first from the prefix token, each window predicting the next `max_length` tokens (or the rest)
    from at most `max_length` inputs."""
    nll, hits, count = 0.0, 0, 0
    with torch.no_grad():
        for doc in docs:
            seq = [prefix_id, *tokenizer(doc, add_special_tokens=False)["input_ids"]]
            predicted = 0
            while predicted < len(seq) - 1:
                k = min(max_length, len(seq) - 1 - predicted)
                hi = predicted + k
                lo = max(0, hi - max_length)
                logits = model(torch.tensor([seq[lo:hi]]))[0, -k:]  # [k, V]
                targets = torch.tensor(seq[hi - k + 1:hi + 1])
                nll += F.cross_entropy(logits.double(), targets, reduction="sum").item()
                hits += int((logits.argmax(-1) == targets).sum())
                count += k
                predicted = hi
    return math.exp(nll / count), hits / count


# ---------------------------------------------------------------------------------------------------
# The smoke preset end to end


def test_smoke_run_has_every_cell_with_the_contracted_metrics(smoke_run: Path):
    rows = read_jsonl(smoke_run / "results.jsonl")
    assert sorted((r["config"], r["seed"]) for r in rows) == sorted((c, s) for c in CONFIGS for s in (42, 123))
    for r in rows:
        assert r["status"] == "ok" and r["error"] is None
        assert set(r["metrics"]) >= CONTRACT_METRICS
        assert 1.0 < r["metrics"]["val_ppl"] < 259 and 0.0 < r["metrics"]["accuracy"] < 1.0
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert summary["study"] == "mu" and summary["reference"] == "dense" and summary["candidate"] == "mu-sota"
    assert summary["decision"]["scenario"] in {"A", "B", "C", "D", "not-significant"}
    # The decision is on test perplexity (the checkpoint is selected on validation, so val_ppl is optimistic), as a
    # ratio: the geometric mean of the per-seed ratios, recomputed from the cells.
    assert summary["primary_metric"] == "test_ppl" and summary["decision"]["metric"] == "test_ppl"
    ppl = {(r["config"], r["seed"]): r["metrics"]["test_ppl"] for r in rows}
    mean_log = sum(math.log(ppl["mu-sota", s] / ppl["dense", s]) for s in (42, 123)) / 2
    change = summary["configs"]["mu-sota"]["vs_reference"]["test_ppl"]
    assert change["delta_pct"] == pytest.approx(100 * math.expm1(mean_log))
    assert change["ci95"] is None or change["ci95"][0] > -100.0
    assert summary["decision"]["improvement_pct"] == pytest.approx(-100 * math.expm1(mean_log))
    report = (smoke_run / "report.md").read_text()
    assert report.splitlines()[0] == "# mu study (smoke preset): a pipeline check, not evidence"
    claims = {c["id"]: c for c in summary["claims"]}
    assert list(claims) == ["M1", "M2", "M3"]
    assert claims["M1"]["verdict"].startswith("not testable at this scale (data: lmlab's built-in generated text, not "
                                              "WikiText-2")
    assert claims["M2"]["verdict"].startswith("not testable at this scale")
    # each row's setting is the notes' (M2 at its recipe's 192 tokens), then what this run does differently
    params = summary["configs"]["mu-sota"]["trainable_params"]
    assert claims["M1"]["setting"].startswith("12 layers, ~16.7M parameters, WikiText-2, 128 tokens; this run differs")
    assert claims["M2"]["setting"].startswith("12 layers, ~16.7M parameters, WikiText-2, 192 tokens; this run differs")
    assert f"; {params:,} parameters, not ~16.7M" in claims["M2"]["setting"]
    assert claims["M2"]["setting"].endswith(f"; {study_config(smoke_run).max_seq_len} tokens, not 192")
    decision = summary["decision"]
    m3 = claims["M3"]["verdict"]
    if decision["scenario"] == "worse":
        assert m3.startswith("not supported at this budget: MU has significantly higher test perplexity")
    elif decision["credited"]:
        assert m3.startswith("supported at this budget")
    else:  # a claim of direction whose interval holds 0 (or a gain the study does not credit): no significant gain
        assert m3.startswith("not supported at this budget: no significant gain")
    assert "## Claims of the research notes vs this run" in report and "| M3: MU helps" in report
    # the claims' preamble defines the verdicts M3 reads at this budget
    assert "A claim that a model helps is read at this run's training budget: supported at this budget where" in report


def test_dense_baseline_matches_mu_sota_parameters_within_two_percent(smoke_run: Path):
    rows = read_jsonl(smoke_run / "results.jsonl")
    for seed in (42, 123):
        counts = {}
        for config in CONFIGS:
            row = next(r for r in rows if r["config"] == config and r["seed"] == seed)
            model, _, _ = load_checkpoint(smoke_run / row["details"]["checkpoint"])
            named = dict(model.named_parameters())  # a tied head is listed once, as tok_emb
            total = sum(p.numel() for p in named.values())
            assert row["metrics"]["params_total"] == total
            embeddings = sum(named[n].numel() for n in EMBEDDING_TABLES if n in named)
            assert row["metrics"]["params_non_embedding"] == total - embeddings
            counts[config] = total
        assert abs(counts["dense"] - counts["mu-sota"]) / counts["mu-sota"] <= 0.02


@pytest.mark.parametrize("config", CONFIGS)
def test_best_checkpoint_is_the_best_evaluation_and_reproduces_its_perplexities(smoke_run: Path, config: str):
    cfg = study_config(smoke_run)
    row = next(r for r in read_jsonl(smoke_run / "results.jsonl") if r["config"] == config and r["seed"] == 42)
    evals = [e for e in read_jsonl(smoke_run / "cells" / config / "seed-42" / "metrics.jsonl") if e["kind"] == "eval"]
    best = min(evals, key=lambda e: e["val_ppl"])
    assert len(evals) >= 4
    assert row["metrics"]["val_ppl"] == pytest.approx(best["val_ppl"], rel=1e-12)
    assert row["metrics"]["best_step"] == best["step"]

    model, tokenizer, extra = load_checkpoint(smoke_run / row["details"]["checkpoint"])
    assert extra["step"] == best["step"] and extra["val_ppl"] == pytest.approx(best["val_ppl"], rel=1e-12)
    _, val_docs, test_docs = documents(cfg)
    prefix = tokenizer.bos_token_id
    val_ppl, val_acc = reference_ppl(model, tokenizer, val_docs, cfg.max_seq_len, prefix)
    test_ppl, test_acc = reference_ppl(model, tokenizer, test_docs, cfg.max_seq_len, prefix)
    assert row["metrics"]["val_ppl"] == pytest.approx(val_ppl, rel=1e-4)
    assert row["metrics"]["accuracy"] == pytest.approx(val_acc, abs=1e-9)
    assert row["metrics"]["test_ppl"] == pytest.approx(test_ppl, rel=1e-4)
    assert row["metrics"]["test_accuracy"] == pytest.approx(test_acc, abs=1e-9)
    # Bits per byte from the same NLL: ln(ppl) * tokens / ln 2 / bytes.
    tokens = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in val_docs)
    n_bytes = sum(len(d.encode("utf-8")) for d in val_docs)
    assert row["metrics"]["val_bpb"] == pytest.approx(math.log(val_ppl) * tokens / math.log(2) / n_bytes, rel=1e-4)


def test_samples_every_epoch_and_from_the_loaded_checkpoint(smoke_run: Path):
    cfg = study_config(smoke_run)
    cell = smoke_run / "cells" / "mu-sota" / "seed-42"
    samples = read_jsonl(cell / "eval_samples.jsonl")
    periodic = [s for s in samples if s["kind"] == "periodic"]
    # Two epochs, samples every epoch: one set per epoch, at the first evaluation after each epoch ends.
    assert sorted({int(s["epoch"]) for s in periodic}) == [1, 2]
    assert len(periodic) == 2 * len(cfg.generation.prompts)
    final = [s for s in samples if s["kind"] == "best_checkpoint"]
    assert [s["prompt"] for s in final] == cfg.generation.prompts
    assert all(s["text"].strip() for s in final)

    model, tokenizer, _ = load_checkpoint(cell / "checkpoint")
    again = generate_samples(model, tokenizer, tokenizer.bos_token_id, cfg.generation, seed=42)
    assert again == [{"prompt": s["prompt"], "text": s["text"]} for s in final]


def test_report_shows_models_side_by_side_bands_curves_flags_and_samples(smoke_run: Path):
    report = (smoke_run / "report.md").read_text()
    for section in ("## Decision", "## Models side by side", "## Perplexity bands", "## Red flags",
                    "## Generation samples", "validation_curves.png", "training_curves.png"):
        assert section in report, section
    for plot in ("training_curves.png", "validation_curves.png"):
        assert (smoke_run / "plots" / plot).stat().st_size > 1000
    summary = json.loads((smoke_run / "summary.json").read_text())
    # the paired gap at each evaluation, plotted where at least two evaluations have an interval
    gap = summary.get("validation_gap") or {"changes": []}
    plotted = sum(bool(c.get("ci95")) for c in gap["changes"]) >= 2
    assert ("plots/validation_gap.png" in report) == plotted == (smoke_run / "plots" / "validation_gap.png").is_file()
    cfg = study_config(smoke_run)
    rows = read_jsonl(smoke_run / "results.jsonl")
    for config in CONFIGS:
        assert cfg.band_metric == "test_ppl"  # the selected checkpoint's test perplexity, not the optimistic val
        mean = summary["configs"][config]["metrics"][cfg.band_metric]["mean"]
        bands = [ppl_band(r["metrics"][cfg.band_metric], cfg.success_ppl, cfg.partial_ppl)
                 for r in rows if r["config"] == config]
        counts = ", ".join(f"{b} {bands.count(b)}" for b in ("success", "partial", "failure") if b in bands)
        assert (f"| {config} | {beside_thresholds(mean, (cfg.success_ppl, cfg.partial_ppl))} | "
                f"{band_cell(mean, bands, cfg.success_ppl, cfg.partial_ppl)} | {counts} of {len(bands)} |") in report
        row = next(r for r in rows if r["config"] == config)
        assert f"{row['metrics']['params_total']:,} | {row['metrics']['params_non_embedding']:,}" in report


def test_out_of_memory_cell_is_reported_with_smaller_settings(smoke_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    with pytest.raises(OutOfMemory) as caught, out_of_memory_advice("training mu-sota", 192, 4, 8):
        allocate_too_much()
    seed = read_jsonl(run / "results.jsonl")[-1]["seed"]  # one of the run's cells fails instead
    kept = [r for r in read_jsonl(run / "results.jsonl") if (r["config"], r["seed"]) != ("mu-sota", seed)]
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    RunDir(run).append_result({"config": "mu-sota", "seed": seed, "status": "failed", "metrics": {},
                               "error": f"OutOfMemory: {caught.value}"})
    regenerate(run)  # what `lmlab report DIR` runs
    report = (run / "report.md").read_text()
    flag_rows = [line for line in report.splitlines() if "| out-of-memory |" in line]
    assert len(flag_rows) == 1 and "max_seq_len=160" in flag_rows[0] and "batch_size=2 grad_accum=16" in flag_rows[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["failed_cells"] == [{"config": "mu-sota", "seed": seed, "error": f"OutOfMemory: {caught.value}"}]


# ---------------------------------------------------------------------------------------------------
# The paper preset on local files


def hf_model_dir(directory: Path, texts: list[str]) -> Path:
    """A save_pretrained directory (tiny GPT-2 + its BPE tokenizer), standing in for `gpt2` offline."""
    tokenizer = train_bpe_tokenizer(texts, 300)
    cfg = TinyModelConfig(arch="gpt2", hidden_size=32, num_layers=1, num_heads=2, context=64)
    model = build_tiny(cfg, len(tokenizer), bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id,
                       pad_id=tokenizer.pad_token_id)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_paper_preset_runs_on_local_files_with_the_notes_recipe(tmp_path: Path):
    data = tmp_path / "wikitext-local"
    data.mkdir()
    for split, seed, n in (("train", 1, 30), ("validation", 2, 2), ("test", 3, 2)):
        docs = generators.corpus_documents(seed, n, 10)
        text = "\n\n".join(f" = Article {i} = \n\n {doc}" for i, doc in enumerate(docs))
        (data / f"{split}.txt").write_text(text, encoding="utf-8")
    hf_dir = hf_model_dir(tmp_path / "hf-model", [(data / "train.txt").read_text()])
    out = tmp_path / "run"
    # In process (the smoke test covers the command line): the paper preset, three optimizer steps, context 32.
    run_study("mu", preset="paper", out=str(out), seeds=1, progress=False,
              overrides=[f"dataset={data}", f"tokenizer={hf_dir}", "max_seq_len=32", "train.max_steps=3",
                         "train.log_every=1", "generation.max_new_tokens=6"])
    record = RunDir(out).read_study()
    train_cfg = record["config"]["train"]
    assert (train_cfg["batch_size"], train_cfg["grad_accum"], train_cfg["lr"], train_cfg["warmup_steps"],
            train_cfg["epochs"]) == (4, 8, 1e-4, 2000, 30)
    assert record["preset"] == "paper" and record["seeds"] == [42]
    rows = read_jsonl(out / "results.jsonl")
    assert sorted(r["config"] for r in rows) == sorted(CONFIGS)
    assert all(r["status"] == "ok" and set(r["metrics"]) >= CONTRACT_METRICS for r in rows)
    layers = {r["config"]: r["details"]["model"]["config"]["n_layers"] for r in rows}
    assert layers == {"mu-sota": 12, "mu-simple": 8, "dense": 12}
    # The schedule steps once per optimizer step (8 micro-batches each): linear warmup lr = 1e-4 * k / 2000.
    logged = [e for e in read_jsonl(out / "cells" / "mu-sota" / "seed-42" / "metrics.jsonl") if e["kind"] == "train"]
    assert [e["step"] for e in logged] == [1, 2, 3]
    for e in logged:
        assert e["lr"] == pytest.approx(1e-4 * e["step"] / 2000, rel=1e-9)
    # The checkpoint carries the HF tokenizer the run used.
    _, tokenizer, _ = load_checkpoint(out / "cells" / "dense" / "seed-42" / "checkpoint")
    assert tokenizer.get_vocab() == load_tokenizer(str(hf_dir)).get_vocab()


# ---------------------------------------------------------------------------------------------------
# Components of the recipe


def test_plateau_flag_after_patience_evaluations_without_a_new_best():
    monitor = RedFlagMonitor(MonitorConfig(patience=2, rising=99), lr=1e-4)
    raised = [monitor.update(step, step / 10, ppl) for step, ppl in enumerate([50, 40, 41, 40.5, 39, 39.5, 39.2, 39.1])]
    plateaus = [(i, f["step"]) for i, flags in enumerate(raised) for f in flags if f["flag"] == "plateau"]
    # Best 40 at index 1; indices 2 and 3 do not beat it -> flag at 3. New best 39 at 4; 5, 6 -> flag at 6;
    # index 7 is still on the same plateau and raises nothing new.
    assert plateaus == [(3, 3), (6, 6)]
    assert "try lr=5e-05" in raised[3][0]["message"]


def test_plateau_needs_the_relative_improvement_min_delta():
    monitor = RedFlagMonitor(MonitorConfig(patience=2, min_delta=0.01, rising=99), lr=1e-3)
    flags = [monitor.update(i, 0.0, ppl) for i, ppl in enumerate([100.0, 99.5, 99.0, 98.0])]
    # 99.5 and 99.0 improve by less than 1% of 100 -> plateau at index 2; 98.0 is a new best.
    assert [i for i, f in enumerate(flags) if f] == [2]
    assert monitor.best == 98.0


def test_oscillation_flag_after_consecutive_rises_of_the_validation_loss():
    monitor = RedFlagMonitor(MonitorConfig(patience=99, rising=3), lr=1e-4)
    series = [30, 20, 21, 22, 21, 22, 23, 24, 25]
    raised = [monitor.update(i, 0.0, ppl) for i, ppl in enumerate(series)]
    oscillations = [i for i, flags in enumerate(raised) for f in flags if f["flag"] == "oscillation"]
    # Rises at 2, 3 (broken at 4), then 5, 6, 7 (third consecutive rise) -> flagged once at 7, not again at 8.
    assert oscillations == [7]
    assert f"{math.log(24):.4f}" in raised[7][0]["message"]


@pytest.mark.parametrize("device", DEVICES)
def test_out_of_memory_advice_names_smaller_settings(device):
    expected = r"at max_seq_len=192, batch_size=4; try max_seq_len=160, or batch_size=2 grad_accum=16 \(same effective"
    with pytest.raises(OutOfMemory, match=expected), out_of_memory_advice("training dense", 192, 4, 8):
        allocate_too_much(device)
    with pytest.raises(OutOfMemory, match=expected), out_of_memory_advice("training dense", 192, 4, 8):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 TiB")  # what CUDA raises
    with pytest.raises(OutOfMemory, match=r"try max_seq_len=96$"), out_of_memory_advice("training dense", 128, 1, 1):
        raise MemoryError()
    with pytest.raises(ValueError, match="not memory"), out_of_memory_advice("training dense", 128, 4, 1):
        raise ValueError("not memory")


def test_ppl_bands_follow_the_notes_rule():
    assert [ppl_band(p, 200, 300) for p in (120.0, 199.9, 200.0, 300.0, 300.1, float("nan"), None)] == [
        "success", "success", "partial", "partial", "failure", "failure", "failure"]


def test_a_value_beside_a_band_threshold_is_printed_on_its_side_of_it():
    """4 significant digits unless they would round a value onto or across a threshold: then to the first significant
    digit of its distance to it (or further, until the printed number is on the right side)."""
    cases = {10.000874: "10.0009", 9.99996: "9.99996", 13.99999: "13.99999", 14.00004: "14.00004",
             9.9996: "9.9996", 10.99: "10.99", 10.0: "10", 12.5: "12.5", 1234.5: "1234", None: "-"}
    for value, text in cases.items():
        assert beside_thresholds(value, (10.0, 14.0)) == text, value
        if value is not None and value != 10.0:
            printed = float(text.replace(",", ""))
            assert ppl_band(printed, 10, 14) == ppl_band(value, 10, 14) and printed not in (10.0, 14.0)
    assert beside_thresholds(200.00004, (200.0, 300.0)) == "200.00004"
    assert beside_thresholds(1999.96, (2000.0, 3000.0)) == "1999.96"
    assert beside_thresholds(19999.6, (20000.0, 30000.0)) == "19,999.6"
    assert band_cell(10.0009, ["success", "success", "partial"], 10, 14) == "partial (2 of 3 seeds < 10)"
    assert band_cell(9.9, ["success", "partial", "failure"], 10, 14) == (
        "success (1 of 3 seeds in 10-14, 1 of 3 seeds > 14)")
    assert band_cell(11.0, ["partial", "partial"], 10, 14) == "partial"


def test_the_bands_table_shows_a_mean_that_straddles_a_threshold_and_the_seeds_on_either_side():
    """Planted means: dense 10.000875 (2 of 3 seeds below 10: success; the mean: partial), mu-simple 9.99996 (the
    mean: success; one seed partial), mu-sota 11.23 (far from either threshold: printed as everywhere else)."""
    from lmlab.studies.mu_study import MU, _bands
    from lmlab.studies.report import build_summary

    cfg = load_config(MUStudyConfig, preset_path("mu", "default"), [])
    assert (cfg.success_ppl, cfg.partial_ppl) == (10, 14)
    rows = _mu_rows({"mu-sota": [11.0, 11.5, 11.2], "mu-simple": [9.9, 10.1, 9.99988],
                     "dense": [9.8, 9.9, 10.302625]})
    record = {"study": "mu", "preset": "default", "configurations": list(CONFIGS), "reference": "dense",
              "candidate": "mu-sota", "primary_metric": "test_ppl", "lower_is_better": True, "seeds": [1, 2, 3],
              "comparisons": MU.comparisons(cfg), "roles": {}, "claims": [], "param_match_ratio": None}
    summary = build_summary(record, rows)
    assert summary["configs"]["dense"]["metrics"]["test_ppl"]["mean"] == pytest.approx(10.000875)
    text = "\n".join(_bands(summary, rows, list(CONFIGS), cfg.model_dump(mode="json")))
    assert "| mu-sota | 11.23 | partial | partial 3 of 3 |" in text
    assert "| mu-simple | 9.99996 | success (1 of 3 seeds in 10-14) | success 2, partial 1 of 3 |" in text
    assert "| dense | 10.0009 | partial (2 of 3 seeds < 10) | success 2, partial 1 of 3 |" in text
    assert ("`dense`'s mean test_ppl is printed here to more digits than elsewhere in the report: it lies "
            "0.0009 above the threshold 10, so its band of the mean turns on that margin, far less than the spread "
            "over seeds (std 0.27).") in text
    assert "`mu-simple`'s mean test_ppl is printed here to more digits than elsewhere in the report: it lies " \
           "4e-05 below the threshold 10" in text
    assert "`mu-sota`'s" not in text


@pytest.mark.parametrize("count", ["total", "non_embedding"])
def test_dense_is_matched_by_the_configured_count_and_tying(count: str):
    cfg = MUStudyConfig(max_seq_len=64, mu_sota={"n_layers": 3}, match={"count": count, "tie_embeddings": False})
    configs = model_configs(cfg, vocab_size=512)
    assert configs["mu-sota"].tie_embeddings and not configs["dense"].tie_embeddings
    counts = {}
    for name, model in (("mu-sota", MUModel(configs["mu-sota"])), ("dense", DenseModel(configs["dense"]))):
        named = dict(model.named_parameters())
        total = sum(p.numel() for p in named.values())
        embedding = sum(named[n].numel() for n in EMBEDDING_TABLES if n in named)
        counts[name] = {"total": total, "non_embedding": total - embedding}
    other = "total" if count == "non_embedding" else "non_embedding"
    assert abs(counts["dense"][count] - counts["mu-sota"][count]) / counts["mu-sota"][count] <= 0.02
    # The untied head (512 x width) makes the other count differ by far more than 2%: the mode was used.
    assert abs(counts["dense"][other] - counts["mu-sota"][other]) / counts["mu-sota"][other] > 0.05


def test_presets_hold_the_notes_recipe_and_bad_values_are_config_errors():
    paper = load_config(MUStudyConfig, preset_path("mu", "paper"))
    assert (paper.dataset, paper.tokenizer, paper.max_seq_len, paper.train.batch_size, paper.train.grad_accum,
            paper.train.lr, paper.train.warmup_steps, paper.train.epochs) == (
        "wikitext-2-raw-v1", "gpt2", 192, 4, 8, 1e-4, 2000, 30)
    assert (paper.success_ppl, paper.partial_ppl) == (200, 300)
    default = load_config(MUStudyConfig, preset_path("mu", "default"))
    assert default.seeds == [42, 123, 456, 789, 1011] and default.dataset == "builtin"
    wt103 = load_config(MUStudyConfig, preset_path("mu", "paper"), ["dataset=wikitext-103-raw-v1", "patience=5"])
    assert wt103.dataset == "wikitext-103-raw-v1" and wt103.monitor.patience == 5
    with pytest.raises(ConfigError, match=r"^partial_ppl = 200: must be >= success_ppl \(300\)"):
        load_config(MUStudyConfig, preset_path("mu", "default"), ["success_ppl=300", "partial_ppl=200"])
    with pytest.raises(ConfigError, match=r"^mu_sota = .*: mu-sota: grid 8x8 is not tiled by block_shape 3x3"):
        load_config(MUStudyConfig, preset_path("mu", "default"), ["mu_sota.block_shape=[3, 3]"])


def _mu_rows(test_ppl: dict[str, list[float]], last: bool = True) -> list[dict]:
    return [{"config": c, "seed": s, "status": "ok", "params": {"trainable_params": 1000},
             "metrics": {"test_ppl": v, "best_step": 100 if last else 60}, "details": {"steps": 100}, "error": None}
            for c, values in test_ppl.items() for s, v in zip((1, 2, 3), values, strict=True)]


@pytest.mark.parametrize("last", [True, False])
def test_the_mu_verdict_names_its_budget_and_mu_simple_is_judged_against_mu_sota(last: bool):
    from lmlab.studies.mu_study import MU, mu_claims
    from lmlab.studies.report import build_summary

    cfg = load_config(MUStudyConfig, preset_path("mu", "default"), [])
    rows = _mu_rows({"mu-sota": [11.0, 11.5, 11.2], "mu-simple": [10.6, 11.4, 10.9], "dense": [9.8, 10.1, 9.9]},
                    last)
    record = {"study": "mu", "preset": "default", "configurations": list(CONFIGS), "reference": "dense",
              "candidate": "mu-sota",
              "primary_metric": "test_ppl", "lower_is_better": True, "seeds": [1, 2, 3],
              "comparisons": MU.comparisons(cfg), "roles": {}, "claims": [], "param_match_ratio": None}
    summary = build_summary(record, rows)
    pairs = {(c["candidate"], c["parent"]): c for c in summary["comparisons"]}
    assert set(pairs) == {("mu-sota", "dense"), ("mu-simple", "mu-sota")}  # one change at a time
    assert summary["decision"]["scenario"] == "worse"
    m3 = {c["id"]: c for c in mu_claims(cfg.model_dump(mode="json"), summary, rows)}["M3"]["verdict"]
    assert m3.startswith("not supported at this budget: MU has significantly higher test perplexity than the matched "
                         f"baseline after 3 epochs at one learning rate shared by both and tuned for neither "
                         f"(train.lr = {cfg.train.lr:g}; `lr_grid=[...]` chooses each model's on a tuning seed")
    assert cfg.lr_grid is None  # the default searches no learning rate
    lower = load_config(MUStudyConfig, preset_path("mu", "default"), ["train.lr=0.0007"])
    m3 = {c["id"]: c for c in mu_claims(lower.model_dump(mode="json"), summary, rows)}["M3"]["verdict"]
    assert "(train.lr = 0.0007; `lr_grid=[...]`" in m3  # read from the config
    # best at the last step says little under a schedule that decays to 0; where val_ppl also still fell over the last
    # quarter of training, the models were still improving: the verdict says so, with the measured fall
    from lmlab import stats

    def late(factor: float) -> dict:
        start = {1: 10.0, 2: 10.4, 3: 10.2}
        return {"from": 75, "to": 100, "changes": {c: stats.paired_relative_change(
            {k: v * factor * (1 + 0.001 * k) for k, v in start.items()}, start) for c in CONFIGS}}

    for factor, improving in ((0.98, True), (1.0, False)):
        m3 = {c["id"]: c for c in mu_claims(lower.model_dump(mode="json"), summary, rows, late=late(factor))}["M3"][
            "verdict"]
        assert "over the last quarter of training (from its first evaluation, at step 75, to the last, at step " \
               "100, as the cosine schedule takes the learning rate to 0) val_ppl changed by `mu-sota` " in m3
        assert ("had its best at its last evaluation (6 of 6)" in m3) == (last and improving)
        assert ("not about converged models" in m3) == (last and improving)
        assert ("still falling in every one" in m3) == improving
    assert "last quarter" not in {c["id"]: c for c in mu_claims(lower.model_dump(mode="json"), summary, rows)}["M3"][
        "verdict"]  # without the curves, nothing is said about them
    # with a search, each model's chosen rate (read from its cells) is named, and a choice at the grid's end flagged
    searched = load_config(MUStudyConfig, preset_path("mu", "default"), ["lr_grid=[0.001,0.003,0.01]"])
    for r in rows:
        r["details"]["lr"] = {"mu-sota": 0.003, "dense": 0.01, "mu-simple": 0.003}[r["config"]]
    m3 = {c["id"]: c for c in mu_claims(searched.model_dump(mode="json"), summary, rows)}["M3"]["verdict"]
    assert ("at each model's own learning rate, chosen from 0.001, 0.003, 0.01 by validation perplexity on the "
            "tuning seed (`mu-sota` 0.003, `dense` 0.01); `dense` chose an end of the grid, so a better rate may lie "
            "beyond it") in m3
    assert "tuned for neither" not in m3
    m2 = {c["id"]: c for c in mu_claims(searched.model_dump(mode="json"), summary, rows)}["M2"]["measured"]
    assert m2.startswith("this run: lr 0.003 (mu-sota), 0.003 (mu-simple), 0.01 (dense), 3 epochs")
    # an interval that holds 0 says how much MU can gain at most: the upper end of the improvement's 95% t-interval
    import math

    from scipy import stats as scipy_stats

    tie = _mu_rows({"mu-sota": [10.0, 10.5, 9.7], "mu-simple": [10.6, 11.4, 10.9], "dense": [10.1, 10.2, 9.9]}, last)
    logs = [math.log(a / b) for a, b in zip([10.0, 10.5, 9.7], [10.1, 10.2, 9.9], strict=True)]
    mean, sd = sum(logs) / 3, math.sqrt(sum((v - sum(logs) / 3) ** 2 for v in logs) / 2)
    most = -(math.exp(mean - scipy_stats.t.ppf(0.975, 2) * sd / math.sqrt(3)) - 1) * 100
    m3 = {c["id"]: c for c in mu_claims(cfg.model_dump(mode="json"), build_summary(record, tie), tie)}["M3"]["verdict"]
    # a claim of direction whose interval holds 0 is not supported (no significant gain), with what the seeds show
    assert m3.startswith(f"not supported at this budget: no significant gain - MU gains at most {most:.2g}% over the "
                         "baseline (95% CI), and its test perplexity is the lower on 2 of 3 seeds, after 3 epochs at "
                         "one learning rate")


def test_a_learning_rate_grid_is_validated_and_keeps_the_tuning_seed_apart():
    with pytest.raises(ConfigError, match="holds a learning rate <= 0"):
        load_config(MUStudyConfig, preset_path("mu", "default"), ["lr_grid=[0.001,0]"])
    with pytest.raises(ConfigError, match="tuning_seed=42 is one of the study's seeds"):
        load_config(MUStudyConfig, preset_path("mu", "default"), ["lr_grid=[0.001,0.01]", "tuning_seed=42"])
    with pytest.raises(ConfigError, match="tuning_seed=123 is one of the study's seeds"):
        load_config(MUStudyConfig, preset_path("mu", "default"), ["lr_grid=[0.001,0.01]", "tuning_seed=[7,123]"])
    with pytest.raises(ConfigError, match="must be one seed or a list of distinct seeds"):
        load_config(MUStudyConfig, preset_path("mu", "default"), ["lr_grid=[0.001,0.01]", "tuning_seed=[7,7]"])


@pytest.mark.parametrize("tuning", [None, [7, 8]])
def test_the_learning_rate_search_trains_each_model_at_every_grid_value_and_its_cells_at_the_best(tmp_path: Path,
                                                                                                  tuning):
    """One tuning seed: each score is its search run's best validation perplexity. Several: each seed's run is kept
    apart (lr-<lr>/seed-<s>/) and the score is the geometric mean of their best validation perplexities."""
    out = tmp_path / "run"
    proc = run_cli("run", "mu", "--preset", "smoke", "--out", str(out), "--quiet", "--seeds", "1",
                   "lr_grid=[0.0003,0.003]", *([f"tuning_seed={tuning}".replace(" ", "")] if tuning else []))
    assert proc.returncode == 0, proc.stderr
    tuning_record = json.loads((out / "lr_tuning.json").read_text())
    assert tuning_record["grid"] == [0.0003, 0.003] and tuning_record["seed"] == (tuning or 7)
    rows = {r["config"]: r for r in read_jsonl(out / "results.jsonl")}
    assert set(tuning_record["configs"]) == set(rows)
    for config, entry in tuning_record["configs"].items():
        # each score is the best validation perplexity of that search run, as its own curve recorded it
        for lr in (0.0003, 0.003):
            where = out / "lr_search" / config / f"lr-{lr:g}"
            bests = [min(r["val_ppl"] for r in read_jsonl(path) if "val_ppl" in r)
                     for path in ([where / f"seed-{s}" / "metrics.jsonl" for s in tuning] if tuning else
                                  [where / "metrics.jsonl"])]
            expected = math.exp(sum(math.log(b) for b in bests) / len(bests))
            assert entry["val_ppl"][f"{lr:g}"] == pytest.approx(expected)
            if tuning:
                assert [entry["per_seed"][f"{lr:g}"][str(s)] for s in tuning] == pytest.approx(bests)
        assert entry["lr"] == min((0.0003, 0.003), key=lambda lr: entry["val_ppl"][f"{lr:g}"])
        assert rows[config]["details"]["lr"] == entry["lr"]
        trained = [r["lr"] for r in read_jsonl(out / "cells" / config / "seed-42" / "metrics.jsonl") if "lr" in r]
        assert max(trained) == pytest.approx(entry["lr"])  # the cell's schedule peaks at the chosen rate
    report = (out / "report.md").read_text()
    how = ("the validation perplexity of one run on the tuning seed 7" if not tuning else
           "the geometric mean of the validation perplexities of runs on the tuning seeds 7, 8")
    assert "## Learning rate" in report and f"chosen from 0.0003, 0.003 by {how}" in report


@pytest.mark.parametrize(("late_gap", "reading"), [
    ((1.20, 1.10), "it narrowed"), ((1.10, 1.20), "it widened"), ((1.15, 1.15), "no significant change")])
def test_the_validation_gap_over_the_second_half_is_paired_by_seed_and_read_by_its_interval(tmp_path: Path, late_gap,
                                                                                             reading):
    """curve_gap on planted curves: mu-sota's validation perplexity is dense's times a factor per step (with a little
    seed-specific noise); the change at each step and the trend over the second half are checked against a direct
    computation on the log scale, and the sentence reads the trend's interval (planted: narrowing, widening, flat)."""
    from types import SimpleNamespace

    from scipy import stats as scipy_stats

    from lmlab.studies.mu_study import _gap_lines, _trend_clause, curve_gap

    steps = [10, 20, 30, 40]  # the second half: from step 20 (the first at or after 40 / 2) to step 40
    # most of the move by step 30, the start of the last quarter (the first at or after 0.75 x 40)
    factors = {10: 1.40, 20: late_gap[0], 30: late_gap[0] + 0.9 * (late_gap[1] - late_gap[0]), 40: late_gap[1]}
    noise = {1: 1.002, 2: 0.998, 3: 1.001}
    dense = {1: 9.0, 2: 10.0, 3: 11.0}
    rows = []
    for config in ("mu-sota", "dense"):
        for seed in (1, 2, 3):
            cell = tmp_path / "cells" / config / f"seed-{seed}"
            cell.mkdir(parents=True)
            records = [{"step": s, "kind": "train", "loss": 1.0} for s in steps]
            records += [{"step": s, "kind": "eval", "val_ppl": dense[seed] * (
                factors[s] * noise[seed] ** (s / 10) if config == "mu-sota" else 1.0)} for s in steps]
            (cell / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            rows.append({"config": config, "seed": seed, "status": "ok"})
    gap = curve_gap(SimpleNamespace(root=tmp_path), rows, "mu-sota", "dense")
    assert gap["middle"] == 20 and [c["step"] for c in gap["changes"]] == steps
    for c in gap["changes"]:  # the geometric mean over seeds of the per-seed ratio
        logs = [math.log(factors[c["step"]] * noise[s] ** (c["step"] / 10)) for s in (1, 2, 3)]
        assert c["delta_pct"] == pytest.approx(100 * math.expm1(sum(logs) / 3))
    trend = [math.log(noise[s] ** 2 * factors[40] / factors[20]) for s in (1, 2, 3)]
    half = scipy_stats.t.ppf(0.975, 2) * scipy_stats.sem(trend)
    assert gap["trend"]["delta_pct"] == pytest.approx(100 * math.expm1(sum(trend) / 3))
    assert gap["trend"]["ci95"] == pytest.approx([100 * math.expm1(sum(trend) / 3 - half),
                                                  100 * math.expm1(sum(trend) / 3 + half)])
    text = "\n".join(_gap_lines(gap))
    assert "Over the second half of the run (step 20 to step 40;" in text and f": {reading} (" in text
    # the last quarter alone (step 30 to 40), directly on the log scale
    late = [math.log(noise[s] * factors[40] / factors[30]) for s in (1, 2, 3)]
    assert gap["late_from"] == 30 and gap["late_trend"]["delta_pct"] == pytest.approx(
        100 * math.expm1(sum(late) / 3))
    assert ("mostly before the last quarter of training: from step 30 to step 40 the ratio changed by only "
            in text) == (reading != "no significant change")
    clause = _trend_clause(gap)
    assert f": {reading} (" in clause
    assert ("whether more training would close it, this run cannot say" in clause) == (reading == "it narrowed")
    # at different peak rates on a decaying schedule a narrowing gap is not read as a trend more training continues,
    # where the model behind at mid-run (here mu-sota: every planted factor is above 1) has the larger rate
    clause = _trend_clause(gap, {"mu-sota": 0.01, "dense": 0.003}, "cosine")
    assert ("The two train at different peak learning rates (`mu-sota` 0.01, `dense` 0.003) on a cosine schedule"
            in clause) == (reading == "it narrowed")
    assert "whether more training would close it" not in clause
    assert "different peak" not in _trend_clause(gap, {"mu-sota": 0.003, "dense": 0.003}, "cosine")
    # the model ahead at the larger rate: annealing would widen the gap, so it explains no narrowing
    ahead = _trend_clause(gap, {"mu-sota": 0.003, "dense": 0.01}, "cosine")
    assert "different peak" not in ahead
    assert ("whether more training would close it, this run cannot say" in ahead) == (reading == "it narrowed")
    assert curve_gap(SimpleNamespace(root=tmp_path), [r for r in rows if r["config"] == "dense"], "mu-sota",
                     "dense") is None  # nothing to pair


def test_the_report_states_the_models_data_and_training_it_measured(smoke_run: Path):
    import yaml

    from lmlab.mu.config import PRESETS

    config = yaml.safe_load((smoke_run / "study.yaml").read_text())["config"]
    setting = (smoke_run / "report.md").read_text().split("## Setting\n\n")[1].split("\n\n")[0]
    sota = {**PRESETS["mu-sota"], **{k: v for k, v in config["mu_sota"].items() if v is not None}}
    for said in (f"packed windows of {config['max_seq_len']} tokens",
                 f"mu-sota ({sota['n_layers']} layers, a state of {sota['grid']} x {sota['grid']}",
                 f"matched to mu-sota's within {config['match']['tolerance']:.0%}",
                 f"learning rate {config['train']['lr']:g}", f"Seeds: {len(config['seeds'])}"):
        assert said in setting, said


def test_the_late_change_of_validation_perplexity_is_read_from_the_cells_curves(smoke_run: Path):
    """summary.json's late_change: val_ppl at the last evaluation vs the first at or after 75% of its step, paired by
    seed - recomputed here from the cells' metrics.jsonl as a geometric mean of the per-seed ratios."""
    summary = json.loads((smoke_run / "summary.json").read_text())
    late = summary["late_change"]
    assert late is not None and late["from"] < late["to"]
    for config, change in late["changes"].items():
        ratios = []
        for cell in sorted((smoke_run / "cells" / config).glob("seed-*")):
            evals = {r["step"]: r["val_ppl"] for r in read_jsonl(cell / "metrics.jsonl") if r.get("kind") == "eval"}
            ratios.append(evals[late["to"]] / evals[late["from"]])
        expected = 100 * (math.exp(sum(math.log(r) for r in ratios) / len(ratios)) - 1)
        assert abs(change["delta_pct"] - expected) < 1e-9, config
    side = (smoke_run / "report.md").read_text().split("## Models side by side")[1].split("\n\n")[1]
    assert (f"Over the last quarter of training (from its first evaluation, at step {late['from']}, to the last, at "
            f"step {late['to']}") in side


def test_tuning_seeds_that_disagree_on_the_best_rate_are_named():
    from lmlab.studies import lr_search

    record = {"grid": [0.001, 0.01], "seed": [7, 8], "configs": {
        "mu-sota": {"lr": 0.01, "val_ppl": {"0.001": 12.2, "0.01": 12.1},
                    "per_seed": {"0.001": {"7": 14.0, "8": 10.6}, "0.01": {"7": 12.3, "8": 11.9}}},
        "dense": {"lr": 0.001, "val_ppl": {"0.001": 10.0, "0.01": 11.0},
                  "per_seed": {"0.001": {"7": 10.0, "8": 10.0}, "0.01": {"7": 11.0, "8": 11.0}}}}}
    assert lr_search.disagreements(record) == {"mu-sota": {"7": 0.01, "8": 0.001}}
    lines = lr_search.search_lines(record, "the validation split")
    assert lines[-1] == ("The tuning seeds disagree on the best rate for `mu-sota` (seed 7: 0.01, seed 8: 0.001): its "
                         "choice rests on the mean of seeds that point different ways, so another tuning seed could "
                         "change it.")
    one = {**record, "seed": 7, "configs": {c: {k: v for k, v in e.items() if k != "per_seed"}
                                            for c, e in record["configs"].items()}}
    assert lr_search.disagreements(one) == {} and "disagree" not in "\n".join(lr_search.search_lines(one, "x"))


def test_the_late_change_reads_a_rise_a_missing_interval_and_a_flat_end_each_as_what_it_is():
    from lmlab import stats
    from lmlab.studies.mu_study import late_words

    start = {1: 10.0, 2: 10.4, 3: 10.2}

    def late(factor: float, seeds=(1, 2, 3)) -> dict:
        changes = stats.paired_relative_change({k: start[k] * factor * (1 + 0.001 * k) for k in seeds},
                                               {k: start[k] for k in seeds})
        return {"from": 75, "to": 100, "changes": {"mu-sota": changes}}

    cosine = {"lr": 0.003, "schedule": "cosine", "min_lr_ratio": 0.0}
    words, falling = late_words(late(0.97), ["mu-sota"], cosine)
    assert falling and words.endswith("still falling in every one at the end of this budget")
    assert "as the cosine schedule takes the learning rate to 0)" in words
    words, falling = late_words(late(1.03), ["mu-sota"], cosine)
    assert not falling and "rising in `mu-sota`" in words and "levels off" not in words
    words, falling = late_words(late(0.9, seeds=(1,)), ["mu-sota"], cosine)  # one seed: no interval
    assert not falling and "no interval for `mu-sota`" in words
    flat = {"from": 75, "to": 100, "changes": {"mu-sota": stats.paired_relative_change(
        {1: 10.0, 2: 10.5, 3: 9.9}, {1: 10.01, 2: 10.4, 3: 9.95})}}
    words, falling = late_words(flat, ["mu-sota"], {**cosine, "min_lr_ratio": 0.1})
    assert words.endswith("not falling significantly in every one: near where this schedule levels off")
    assert "takes the learning rate to 0.1 times its peak" in words
    words, _ = late_words(flat, ["mu-sota"], {**cosine, "schedule": "constant"})
    assert words.endswith("not falling significantly in every one") and "schedule" not in words


def test_a_comparison_of_models_at_different_chosen_rates_says_so():
    from lmlab.studies.mu_study import _with_rates

    rows = [{"config": c, "seed": s, "status": "ok", "details": {"lr": lr}}
            for c, lr in (("mu-sota", 0.01), ("mu-simple", 0.003), ("dense", 0.003)) for s in (1, 2)]
    comparisons = [{"candidate": "mu-sota", "parent": "dense", "text": "A."},
                   {"candidate": "mu-simple", "parent": "dense", "text": "B."}]
    out = _with_rates(comparisons, {"lr_grid": [0.003, 0.01]}, rows)
    assert out[0]["text"] == ("A. Each trained at its own chosen learning rate (`mu-sota` 0.01, `dense` 0.003): this "
                              "compares the two as tuned, not the change at one rate.")
    decision = {"candidate": "mu-sota", "reference": "dense", "text": "D."}  # the decision names its pair so
    assert _with_rates([decision], {"lr_grid": [0.003, 0.01]}, rows)[0]["text"].startswith("D. Each trained at")
    assert out[1]["text"] == "B."  # the same rate: nothing to add
    assert _with_rates(comparisons, {}, rows)[0]["text"] == "A."  # one shared rate, no search


def test_a_gap_that_moved_back_over_the_last_quarter_is_not_read_as_narrowing_on():
    """Narrowed over the second half, but widened again over the last quarter: said so, and no 'close it' ending."""
    from lmlab import stats
    from lmlab.studies.mu_study import _gap_words, _trend_clause

    def change(values):
        return stats.paired_relative_change({s: v for s, v in enumerate(values, 1)}, dict.fromkeys((1, 2, 3), 1.0))

    gap = {"candidate": "mu-sota", "reference": "dense", "middle": 20, "late_from": 30,
           "changes": [{"step": 20, **change([1.30, 1.31, 1.29])}, {"step": 40, **change([1.18, 1.19, 1.17])}],
           "trend": change([0.90, 0.91, 0.905]), "late_trend": change([1.08, 1.081, 1.079])}
    said = _gap_words(gap)[2]
    assert said.startswith("it narrowed")
    assert ", but it moved back over the last quarter of training: from step 30 to step 40 the ratio changed by " \
           "+8.00%" in said
    clause = _trend_clause(gap, {"mu-sota": 0.01, "dense": 0.003}, "cosine")
    assert "close" not in clause and "different peak" not in clause
