"""The study harness end to end through the real CLI: layout, summary contract, report, resume."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import (
    LMLAB,
    ONE_THREAD,
    assert_close,
    assert_run_layout,
    comparable_summary,
    require_extras,
    run_cli,
    run_smoke_study,
)
from lmlab.engine.hooks import Display
from lmlab.engine.state import complete_checkpoints
from lmlab.studies.report import build_summary
from lmlab.studies.rundir import TRAIN_STATE, RunDir

pytestmark = pytest.mark.xdist_group("studies")

HYLORADA_CONFIGS = ["base", "lora", "rslora", "lora-lr-scaled", "rslora+dora", "rslora+bias", "rslora+bias-fast",
                    "rslora+landmarks", "rslora+bias+landmarks", "rslora+bias+learnable_bucket", "rslora+constant",
                    "rslora+bias+constant", "rslora-matched", "landmarks-only", "rslora-frozen+bias", "lora+embed+norm"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    return run_smoke_study(tmp_path_factory.mktemp("smoke"), "hylorada")


def test_smoke_run_writes_the_contracted_layout(smoke_run: Path):
    assert_run_layout(smoke_run, ["training_curves.png", "perplexity_by_decile.png", "component_by_decile.png",
                                  "retrieval_by_depth.png", "bucket_boundaries.png"])
    rows = [json.loads(line) for line in (smoke_run / "results.jsonl").read_text().splitlines()]
    assert sorted((r["config"], r["seed"]) for r in rows) == sorted((c, s) for c in HYLORADA_CONFIGS for s in (42, 123))
    for r in rows:
        assert set(r) >= {"config", "seed", "status", "metrics", "error"}
        assert r["status"] == "ok" and r["error"] is None
        cell = smoke_run / "cells" / r["config"] / f"seed-{r['seed']}"
        assert (cell / "config.json").is_file()
        if r["config"] != "base":
            assert (cell / "metrics.jsonl").is_file()
            assert (cell / "adapter" / "adapter_model.safetensors").is_file()
        assert {"val_ppl", "val_bpb", "lim_ppl", "retrieval_acc"} <= set(r["metrics"])


def test_summary_follows_the_contract(smoke_run: Path):
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert summary["study"] == "hylorada" and summary["preset"] == "smoke"
    assert summary["reference"] == "lora" and summary["seeds"] == [42, 123]
    assert summary["decision"]["scenario"] in {"A", "B", "C", "D", "not-significant", "worse",
                                               "explained-by-control", "control-unresolved", "uncontrolled"}
    assert summary["decision"]["text"]
    # The headline is HyLoRADA's new components over rsLoRA, not over LoRA (whose gap is rsLoRA's scaling).
    assert summary["decision"]["candidate"] == "rslora+bias+landmarks"
    assert summary["decision"]["reference"] == "rslora"
    assert summary["failed_cells"] == []
    rows = [json.loads(line) for line in (smoke_run / "results.jsonl").read_text().splitlines()]
    for name, entry in summary["configs"].items():
        assert entry["n_ok"] == 2 and entry["n_failed"] == 0
        assert isinstance(entry["trainable_params"], int)
        values = [r["metrics"]["val_ppl"] for r in rows if r["config"] == name]
        stats = entry["metrics"]["val_ppl"]
        assert stats["values"] == values
        assert stats["mean"] == pytest.approx(sum(values) / 2)
        assert stats["std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
        lo, hi = stats["ci95"]
        assert lo < stats["mean"] < hi
        if name == "lora":
            assert entry["vs_reference"] == {}
            continue
        change = entry["vs_reference"]["val_ppl"]
        ref = {r["seed"]: r["metrics"]["val_ppl"] for r in rows if r["config"] == "lora"}
        mine = {r["seed"]: r["metrics"]["val_ppl"] for r in rows if r["config"] == name}
        per_seed = [100 * (mine[s] - ref[s]) / ref[s] for s in (42, 123)]
        assert list(change["per_seed"].values()) == pytest.approx(per_seed)
        mean_log = sum(math.log(mine[s] / ref[s]) for s in (42, 123)) / 2  # a ratio: geometric mean
        assert change["delta_pct"] == pytest.approx(100 * math.expm1(mean_log))
        assert set(change) >= {"delta_pct", "ci95", "p_value"}
    assert summary["configs"]["base"]["trainable_params"] == 0
    assert summary["configs"]["lora"]["trainable_params"] > 0


def test_report_shows_table_decision_and_boundaries(smoke_run: Path):
    report = (smoke_run / "report.md").read_text()
    assert "## Decision" in report and "rslora+bias+landmarks" in report
    assert "| configuration | val_ppl |" in report
    assert "Learned bucket boundaries" in report
    assert "plots/training_curves.png" in report


def test_report_command_reproduces_the_summary_exactly(smoke_run: Path, tmp_path: Path):
    before = (smoke_run / "summary.json").read_bytes()
    (smoke_run / "summary.json").unlink()
    (smoke_run / "report.md").unlink()
    proc = run_cli("report", str(smoke_run))
    assert proc.returncode == 0, proc.stderr
    assert (smoke_run / "summary.json").read_bytes() == before
    assert (smoke_run / "report.md").is_file()


def sigterm_after_rows(out: Path, rows: int, *extra: str) -> None:
    """`lmlab run hylorada --preset smoke` into `out`, stopped by SIGTERM once `rows` cells are recorded."""
    # one thread, as `run_cli` (and so the reference run) uses: the same kernels' reductions, the same digits
    proc = subprocess.Popen([*LMLAB, "run", "hylorada", "--preset", "smoke", "--out", str(out), "--quiet", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD)
    results = out / "results.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and len(results.read_text().splitlines()) >= rows:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "--resume" in stderr and "Traceback" not in stderr


def test_sigterm_then_resume_keeps_finished_cells_and_matches_an_uninterrupted_run(smoke_run: Path, tmp_path: Path):
    out = tmp_path / "killed"
    sigterm_after_rows(out, 2)
    results = out / "results.jsonl"
    finished_before = [json.loads(line) for line in results.read_text().splitlines()]
    assert 2 <= len(finished_before) < 2 * len(HYLORADA_CONFIGS)
    # Finished cells have directories; a partial cell keeps its directory only when it holds a complete
    # training checkpoint to continue from (written when the signal stopped its training), else it is discarded.
    cell_dirs = {(p.parent.name, int(p.name.split("-")[1])) for p in (out / "cells").glob("*/seed-*")}
    finished_keys = {(r["config"], r["seed"]) for r in finished_before}
    assert finished_keys <= cell_dirs
    for config, seed in cell_dirs - finished_keys:
        assert complete_checkpoints(out / "cells" / config / f"seed-{seed}" / TRAIN_STATE), (config, seed)
    assert len(cell_dirs - finished_keys) <= 1
    stamps = {(r["config"], r["seed"]): os.stat(out / "cells" / r["config"] / f"seed-{r['seed']}" / "config.json")
              .st_mtime_ns for r in finished_before}

    resumed = run_cli("run", "hylorada", "--resume", str(out), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    keys = [(r["config"], r["seed"]) for r in rows]
    assert len(keys) == len(set(keys)) == 2 * len(HYLORADA_CONFIGS)
    assert rows[: len(finished_before)] == finished_before  # not recomputed
    for key, stamp in stamps.items():
        assert os.stat(out / "cells" / key[0] / f"seed-{key[1]}" / "config.json").st_mtime_ns == stamp
    resumed_summary = comparable_summary(json.loads((out / "summary.json").read_text()))
    reference_summary = comparable_summary(json.loads((smoke_run / "summary.json").read_text()))
    assert_close(resumed_summary, reference_summary)


def test_resume_refuses_overrides_and_existing_out_is_never_overwritten(smoke_run: Path):
    proc = run_cli("run", "hylorada", "--resume", str(smoke_run), "train.lr=0.1")
    assert proc.returncode == 2 and "--resume" in proc.stderr
    proc = run_cli("run", "hylorada", "--preset", "smoke", "--out", str(smoke_run))
    assert proc.returncode == 2
    assert "already exists" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_summary_is_a_function_of_the_results(smoke_run: Path):
    run = RunDir(smoke_run)
    rebuilt = build_summary(run.read_study(), run.read_results())
    assert rebuilt == json.loads((smoke_run / "summary.json").read_text())


# ---------------------------------------------------------------------------------------------------
# What makes the HyLoRADA study's conclusions attributable (the smoke run above)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]


def test_each_component_is_judged_against_its_parent_and_its_controls(smoke_run: Path):
    summary = json.loads((smoke_run / "summary.json").read_text())
    by_component = {c["component"]: c for c in summary["comparisons"]}
    landmarks = by_component["landmarks"]
    assert (landmarks["candidate"], landmarks["parent"]) == ("rslora+landmarks", "rslora")
    assert [k["config"] for k in landmarks["controls"]] == ["rslora+constant", "rslora-matched"]
    assert (by_component["DoRA"]["parent"], by_component["position bias"]["parent"]) == ("rslora", "rslora")
    assert by_component["learnable buckets"]["parent"] == "rslora+bias+landmarks"
    for comp in summary["comparisons"]:
        assert (comp["params_per_pct"] is not None) == comp["credited"]
    configs = summary["configs"]
    assert configs["lora+embed+norm"]["param_matched"] is False
    assert configs["rslora+bias+landmarks"]["param_matched"] is True
    # The parameter-matched LoRA trains at least as many parameters as the headline candidate, one rank fewer would not.
    rows = _rows(smoke_run)
    matched = next(r for r in rows if r["config"] == "rslora-matched")
    info = matched["details"]["matched"]
    assert configs["rslora-matched"]["trainable_params"] == info["params"] >= configs["rslora+bias+landmarks"][
        "trainable_params"] == info["candidate_params"] > info["params"] * (info["rank"] - 1) / info["rank"]
    only = next(r for r in rows if r["config"] == "landmarks-only")  # the positive control trains landmarks alone
    assert only["params"]["trainable_params"] == only["details"]["components"]["landmarks"]
    # the bias's positive control trains rsLoRA as `rslora` does, freezes it, then trains the bias alone on top: with
    # the bias removed it is exactly the `rslora` cell of its seed, and it trained both (LoRA, then the bias)
    rslora = {r["seed"]: r["metrics"]["val_ppl"] for r in rows if r["config"] == "rslora"}
    rslora_lim = {r["seed"]: r["metrics"]["lim_ppl"] for r in rows if r["config"] == "rslora"}
    for r in (r for r in rows if r["config"] == "rslora-frozen+bias"):
        assert r["metrics"]["val_ppl_without_position"] == pytest.approx(rslora[r["seed"]], rel=1e-6)
        # the same on the shared long windows: LIM-PPL without the bias is `rslora`'s
        assert r["metrics"]["lim_ppl_without_position"] == pytest.approx(rslora_lim[r["seed"]], rel=1e-6)
        assert r["metrics"]["val_ppl"] != pytest.approx(rslora[r["seed"]], rel=1e-9)  # the bias did train
        components = r["details"]["components"]
        assert components["lora"] == configs["rslora"]["trainable_params"] and components["position_bias"] > 0
    # its training curve is both stages: `rslora`'s steps (the same losses), then the bias stage's after them
    from lmlab.studies.report import cell_curves
    curves = cell_curves(RunDir(smoke_run), ["rslora", "rslora-frozen+bias"], "train", "loss")
    steps = sorted(curves["rslora"])
    assert sorted(curves["rslora-frozen+bias"]) == [*steps, *(steps[-1] + s for s in steps)]
    for s in steps:
        assert curves["rslora-frozen+bias"][s] == pytest.approx(curves["rslora"][s], rel=1e-6)
    for row in rows:  # the "Trainable parameters by component" table adds up to each cell's trainable parameters
        if row["details"].get("components"):
            assert sum(row["details"]["components"].values()) == row["params"]["trainable_params"], row["config"]


def test_position_resolved_perplexity_covers_the_same_tokens_in_every_cell(smoke_run: Path):
    rows = _rows(smoke_run)
    counts = {(tuple(r["details"]["decile_tokens"]), r["details"]["lim_tokens"]) for r in rows}
    assert len(counts) == 1
    (deciles, lim), = counts
    assert sum(deciles) == 24 * 128 and lim == 24 * 64  # 24 full windows of 128 tokens, the middle half for LIM
    assert f"LIM-PPL covers {lim:,} tokens" in (smoke_run / "report.md").read_text()


def test_the_report_has_positive_controls_an_ablation_and_ends_with_the_claims(smoke_run: Path):
    rows = _rows(smoke_run)
    base = [r for r in rows if r["config"] == "base"]
    assert all({"retrieval_acc_short_native", "retrieval_acc_native", "val_ppl_native"} <= set(r["metrics"])
               for r in base)
    for r in rows:
        has_parts = r["config"] not in ("base", "lora", "rslora", "lora-lr-scaled", "rslora+dora", "rslora-matched",
                                         "lora+embed+norm")
        assert ("val_ppl_without_position" in r["metrics"]) == has_parts, r["config"]
        assert ("lim_ppl_without_position" in r["metrics"]) == has_parts, r["config"]
    report = (smoke_run / "report.md").read_text()
    for heading in ("## Attribution", "## Positive controls", "## What the trained position components contribute",
                    "## Learning rate", "effective buckets", "step size alone"):
        assert heading in report
    assert "so `rslora` vs `lora` compares step sizes" in report
    # recall after fine-tuning is compared paired by seed (over the same queries), vs the base and vs the reference
    assert "Paired by seed (" in report and "| vs base, points [95% CI] (p); queries p |" in report
    queries = next(line for line in report.splitlines() if line.startswith("| queries ("))
    total = sum(len(r["details"]["retrieval_outcomes"]) for r in rows if r["config"] == "lora")
    assert sum(int(v.replace(",", "")) for v in queries.split("|")[2:-1]) == total  # per decile, over the seeds
    last = report.split("\n## ")[-1]
    assert last.startswith("Claims of the research notes vs this run")
    assert re.search(r"\| \d+ \| H3: rsLoRA: \+17\.07% over a 69\.00-PPL baseline \|", last)
    assert re.search(r"\| \d+ \| H6: \.\.\. credited to the landmarks \|", last)


def test_training_examples_are_full_packed_windows():
    from lmlab.config import load_config, preset_path
    from lmlab.models.hf import context_length, load_tokenizer
    from lmlab.models.hf import load_config as load_hf_config
    from lmlab.studies.hylorada_study import HYLORADA, HyloradaStudyConfig, _Context
    from lmlab.studies.pretrain import pretrained_tiny

    cfg = load_config(HyloradaStudyConfig, preset_path("hylorada", "smoke"), [])
    path = str(pretrained_tiny(cfg.base, display=Display(progress=False)))
    ctx = _Context(cfg, path, load_tokenizer(path), context_length(load_hf_config(path)), [])
    data = HYLORADA._data(ctx, 42)
    assert len(data.train) == cfg.num_train
    assert all(len(e["input_ids"]) == cfg.max_length for e in data.train)
    tok = ctx.tokenizer
    stream = [t for e in data.train for t in e["input_ids"]]
    assert stream[0] == tok.bos_token_id and tok.eos_token_id in stream  # documents packed: BOS doc EOS BOS ...
    assert all(len(d.text) > 0 for d in data.retrieval_short)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]


def test_parallel_workers_give_the_summary_of_a_sequential_run(smoke_run: Path, tmp_path: Path):
    out = tmp_path / "parallel"
    proc = run_cli("run", "hylorada", "--preset", "smoke", "--out", str(out), "--quiet", "--parallel", "2")
    assert proc.returncode == 0, proc.stderr
    assert "on 2 worker processes" in proc.stderr and "Traceback" not in proc.stderr
    keys = [(r["config"], r["seed"]) for r in _rows(out)]
    assert len(keys) == len(set(keys)) and set(keys) == {(r["config"], r["seed"]) for r in _rows(smoke_run)}
    assert_close(comparable_summary(json.loads((out / "summary.json").read_text())),
                 comparable_summary(json.loads((smoke_run / "summary.json").read_text())))
    assert "Traceback" not in (out / "report.md").read_text()


def test_parallel_run_stopped_by_sigterm_resumes_to_the_sequential_summary(smoke_run: Path, tmp_path: Path):
    out = tmp_path / "parallel-killed"
    sigterm_after_rows(out, 3, "--parallel", "2")
    before = _rows(out)
    assert len({(r["config"], r["seed"]) for r in before}) == len(before) < 2 * len(HYLORADA_CONFIGS)
    # a partial cell keeps its directory only with a checkpoint to continue from
    recorded = {(r["config"], r["seed"]) for r in before}
    for cell in (out / "cells").glob("*/seed-*"):
        key = (cell.parent.name, int(cell.name.split("-")[1]))
        assert key in recorded or complete_checkpoints(cell / TRAIN_STATE), key

    resumed = run_cli("run", "hylorada", "--resume", str(out), "--quiet", "--parallel", "2")
    assert resumed.returncode == 0, resumed.stderr
    rows = _rows(out)
    assert rows[: len(before)] == before  # not recomputed
    keys = [(r["config"], r["seed"]) for r in rows]
    assert len(keys) == len(set(keys)) == 2 * len(HYLORADA_CONFIGS)
    assert_close(comparable_summary(json.loads((out / "summary.json").read_text())),
                 comparable_summary(json.loads((smoke_run / "summary.json").read_text())))


def test_local_executor_jobs_resubmission_and_collection(smoke_run: Path, tmp_path: Path):
    """submitit's local executor: real job processes, the code path of SLURM without the scheduler."""
    require_extras("submitit")
    out = tmp_path / "jobs"
    proc = run_cli("run", "hylorada", "--preset", "smoke", "--seeds", "1", "only=[rslora]", "--out", str(out),
                   "--quiet", "--executor", "local")
    assert proc.returncode == 0, proc.stderr
    assert "submitted 2 cell(s) as local jobs" in proc.stderr
    jobs = json.loads((out / "jobs" / "jobs.json").read_text())
    assert set(jobs) == {"lora/seed-42", "rslora/seed-42"}
    reference = {(r["config"], r["seed"]): r for r in _rows(smoke_run)}
    rows = {(r["config"], r["seed"]): r for r in _rows(out)}
    assert set(rows) == {("lora", 42), ("rslora", 42)}
    for key, row in rows.items():  # each job computed its cell as the sequential run did
        metrics = {k: v for k, v in row["metrics"].items() if not any(s in k for s in ("time", "mem", "per_s"))}
        assert_close(metrics, {k: reference[key]["metrics"][k] for k in metrics})
        assert (out / "cells" / key[0] / f"seed-{key[1]}" / "result.json").is_file()

    # a row its job wrote but no submitting process recorded: `lmlab report` records it
    first_row = rows[("lora", 42)]
    (out / "results.jsonl").write_text(json.dumps(first_row) + "\n")
    assert run_cli("report", str(out)).returncode == 0
    assert {(r["config"], r["seed"]) for r in _rows(out)} == set(rows)

    # --resume submits only the cells without a result
    (out / "results.jsonl").write_text(json.dumps(first_row) + "\n")
    (out / "cells" / "rslora" / "seed-42" / "result.json").unlink()
    again = run_cli("run", "hylorada", "--resume", str(out), "--quiet", "--executor", "local")
    assert again.returncode == 0, again.stderr
    assert "submitted 1 cell(s) as local jobs" in again.stderr
    assert _rows(out)[0] == first_row and {(r["config"], r["seed"]) for r in _rows(out)} == set(rows)
    assert len(json.loads((out / "jobs" / "jobs.json").read_text())) == 2


def test_h5_says_how_many_position_bias_parameters_the_run_trained_against_the_notes_64(smoke_run: Path):
    from safetensors import safe_open

    # counted from the saved adapter: the bias table and one gate per adapted projection
    path = smoke_run / "cells" / "rslora+bias" / "seed-42" / "adapter" / "adapter_model.safetensors"
    with safe_open(str(path), "pt") as f:
        counted = sum(f.get_slice(k).get_shape()[0] for k in f.keys()  # noqa: SIM118 (safe_open is not iterable)
                      if k.endswith("position_bias.table") or k.endswith("position_gate"))
    summary = json.loads((smoke_run / "summary.json").read_text())
    h5 = next(c for c in summary["claims"] if c["id"] == "H5")
    said = f"{counted} position-bias parameters, table and gates (the notes: 64)"
    assert counted != 64 and said in h5["setting_differs"]
    row = next(line for line in (smoke_run / "report.md").read_text().splitlines()
               if re.match(r"\| \d+ \| H5:", line))
    assert "this run differs: " + said in row
