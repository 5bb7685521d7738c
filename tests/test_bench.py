"""The benchmark harness (`lmlab.benchsuite.suite` via `lmlab.bench`) on tiny sizes, and the code paths the
optimisations rely on: the fused AdamW, DoRA's folded row scale, autocast, SDPA and the compile flag."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lmlab.bench import run_benchmarks
from lmlab.benchsuite import busy_cpu as busy
from lmlab.benchsuite import results_dir, source_checkout, suite
from lmlab.engine.train import TrainConfig, _autocast, build_optimizer, train
from lmlab.errors import LmlabError
from lmlab.hylorada import HyLoRADAConfig
from lmlab.hylorada.layers import HyLoRADALinear

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def on_cpu(monkeypatch):
    """The CPU benchmarks on the CPU also where there is a GPU (`lmlab bench` under LMLAB_DEVICE=cpu)."""
    monkeypatch.setenv("LMLAB_DEVICE", "cpu")


def tiny_settings(**overrides) -> object:
    return suite.Settings(**{"quick": True, "threads": 1, "sizes": suite.TINY, "memory": False, **overrides})


# ---------------------------------------------------------------------------------------------------
# Harness


def test_interleaved_flips_the_order_every_round_and_times_each_call():
    calls: list[str] = []

    def case(name: str, seconds: float):
        def run():
            calls.append(name)
            time.sleep(seconds)
        return run

    times = suite.interleaved({"a": case("a", 0.002), "b": case("b", 0.004)}, 1, 4, torch.device("cpu"))
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up, then A B, B A, A B, B A
    assert [len(t) for t in times.values()] == [4, 4]
    assert min(times["a"]) >= 0.002 and min(times["b"]) >= 0.004
    expected = statistics.median(a / b for a, b in zip(times["a"], times["b"], strict=True))
    assert suite.paired_ratio(times["a"], times["b"]) == expected


@pytest.mark.parametrize("n", [1, 5, 6, 11, 15, 31, 61])
def test_median_interval_is_the_binomial_order_statistic_interval(n):
    from math import comb

    def below(k: int) -> float:  # P(Binomial(n, 1/2) < k), summed by hand
        return sum(comb(n, i) for i in range(k)) / 2**n

    ranks = [k for k in range(1, n // 2 + 1) if below(k) <= 0.025]
    values = [float(v) for v in torch.randperm(n).tolist()]  # 0 .. n-1 in random order
    if not ranks:  # too few rounds for a 95% interval (the --quick runs)
        assert n < 6 and suite.median_interval(values) is None
        return
    k = max(ranks)
    assert suite.median_interval(values) == (k - 1, n - k)
    if n == 31:
        assert (k, n + 1 - k) == (10, 22)


def test_a_target_inside_the_interval_is_reported_as_within_noise():
    times = {"ours": [0.84, 0.86, 0.85, 0.80, 0.90, 0.83, 0.87], "theirs": [1.0] * 7}
    row = suite.compare("b", "ours", "theirs", times, target=0.85)
    assert row.met and row.interval == (0.80, 0.90) and row.within_noise
    assert "within noise" in suite.format_row(row)
    clear = suite.compare("b", "ours", "theirs", times, target=0.95)
    assert clear.met and not clear.within_noise
    assert not suite.compare("b", "ours", "theirs", times).within_noise  # no target


def test_compare_applies_the_target_to_the_paired_ratio():
    times = {"ours": [1.0, 2.0, 3.0], "theirs": [2.0, 2.0, 2.0]}
    row = suite.compare("b", "ours", "theirs", times, target=0.9)
    assert row.ratio == pytest.approx(1.0) and row.ours_value == 2.0 and row.reference_value == 2.0
    assert row.target == "<= 0.9" and row.met is False
    assert suite.compare("b", "ours", "theirs", times, target=1.0).met is True
    assert suite.compare("b", "ours", "theirs", times).met is None


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.usefixtures("on_cpu")
def test_train_benchmark_times_every_variant_from_the_same_weights(arch):
    result, rows = suite.bench_train(arch, tiny_settings())
    variants = result["variants"]
    assert list(variants) == list(suite.TRAIN_VARIANTS)
    assert result["same_first_loss"]  # identical base, identical batch, adapters start as the identity
    losses = [v["first_loss"] for v in variants.values()]
    assert max(losses) - min(losses) < 1e-4
    assert all(len(v["times_s"]) == 3 and v["median_s"] > 0 for v in variants.values())
    sizes = suite.TINY
    assert variants["floor"]["trainable_params"] == sizes.vocab * sizes.hidden  # the (tied) input embedding
    # same adapter size on both sides: r (in + out) per adapted layer, plus DoRA's magnitudes
    assert variants["lmlab-lora"]["trainable_params"] == variants["peft-lora"]["trainable_params"]
    assert variants["lmlab-dora"]["trainable_params"] == variants["peft-dora"]["trainable_params"]
    by_pair = {(r.ours, r.reference): r for r in rows}
    dora = by_pair[("lmlab-dora", "peft-dora")]
    assert dora.target == "<= 0.75"
    assert dora.ratio == suite.paired_ratio(variants["lmlab-dora"]["times_s"], variants["peft-dora"]["times_s"])
    assert by_pair[("lmlab-lora", "floor-lmlab-attn")].target == "<= 1.12"
    assert ("lmlab-lora-sdpa", "peft-lora") in by_pair and ("floor-lmlab-attn", "floor") in by_pair


@pytest.mark.usefixtures("on_cpu")
def test_eval_ppl_benchmark_scores_the_same_tokens_as_the_plain_loop():
    result, (row,) = suite.bench_eval_ppl(tiny_settings())
    assert result["same_tokens"]
    assert result["windows"] > result["documents"]  # several windows per document, last ones partly scored
    assert result["ppl"]["lmlab"] == pytest.approx(result["ppl"]["plain_loop"], rel=1e-5)
    assert row.metric == "tokens/s" and row.met == (row.ratio >= 1.0)


@pytest.mark.usefixtures("on_cpu")
def test_inference_benchmark_merged_model_gives_the_unmerged_logits():
    result, rows = suite.bench_inference(tiny_settings())
    assert result["merged_vs_unmerged_max_abs_diff"] < 1e-4
    assert [(r.ours, r.reference) for r in rows] == [("merged", "base"), ("unmerged", "merged")]


@pytest.mark.usefixtures("on_cpu")
def test_memory_is_measured_in_a_fresh_process():
    spec = {"kind": "train", "arch": "gpt2", "variant": "lmlab-lora", "sizes": suite.asdict(suite.TINY), "seed": 0,
            "threads": 1, "steps": 2}
    memory = suite.peak_memory(spec, tiny_settings(memory=True))
    assert memory["peak_mb"] > 50  # a Python process with torch loaded
    assert 0 <= memory["train_mb"] < memory["peak_mb"]


@pytest.mark.usefixtures("on_cpu")
def test_run_writes_results_json_and_markdown(tmp_path):
    path = suite.run(tiny_settings(), ["hylorada", "mu"], tmp_path, log=lambda line: None)
    assert path.name.endswith("-quick.json")
    results = json.loads(path.read_text())
    machine = results["machine"]
    assert machine["torch_threads"] == 1 and machine["cores"] >= 1
    assert len(machine["load_average_start"]) == 3 and len(machine["load_average_end"]) == 3
    assert set(results["benchmarks"]) == {"hylorada", "mu"}
    assert [(r["ours"], r["reference"]) for r in results["rows"]] == [("hylorada", "lmlab-rslora"), ("mu", "dense")]
    mu = results["benchmarks"]["mu"]["variants"]
    # the dense baseline is matched to MU's parameter count (docs/mu.md: within 2%)
    assert abs(mu["dense"]["parameters"]["total"] / mu["mu"]["parameters"]["total"] - 1) <= 0.02
    table = path.with_suffix(".md").read_text()
    for row in results["rows"]:
        assert f"| {row['ours']} | {row['reference']} |" in table and f"{row['ratio']:.3f}" in table
    # a second run the same day keeps the first one's files
    again = suite.run(tiny_settings(), ["hylorada"], tmp_path, log=lambda line: None)
    assert again != path and path.exists() and again.name.startswith(results["date"] + "T")
    assert again.with_suffix(".md").exists()
    # the README's table (benchmarks/readme_table.py): one column per run, each run's own ratios
    spec = importlib.util.spec_from_file_location("readme_table", REPO / "benchmarks" / "readme_table.py")
    readme_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(readme_table)
    lines = readme_table.table([path, again]).splitlines()
    first, second = results["rows"], json.loads(again.read_text())["rows"]

    def cells(prefix: str) -> list[str]:
        [line] = [line for line in lines if line.startswith(f"| {prefix}")]
        return [c.strip() for c in line.split("|")[1:-1]]

    hylorada = cells("full HyLoRADA")
    assert [c.split()[0] for c in hylorada[1:3]] == [f"{first[0]['ratio']:.3f}", f"{second[0]['ratio']:.3f}"]
    met = int(first[0]["met"]) + int(second[0]["met"])
    assert hylorada[3] == f"{first[0]['target']}: " + ("met" if met == 2 else f"{met} of 2")
    mu = cells("MU")  # only in the first run
    assert mu[1].split()[0] == f"{first[1]['ratio']:.3f}" and mu[2] == "-"


def test_unknown_benchmark_names_are_refused():
    with pytest.raises(LmlabError, match="unknown benchmark"):
        run_benchmarks(quick=True, only=["train_gpt3"])


def test_the_suite_is_part_of_the_package_and_the_checkout_scripts_run_it():
    """`lmlab bench` runs `python -m lmlab.benchsuite.suite`; benchmarks/suite.py and benchmarks/busy_cpu.py are
    thin scripts over the package's modules, and results still land in the checkout's benchmarks/results."""
    assert source_checkout() == REPO and results_dir() == REPO / "benchmarks" / "results"
    assert busy.main.__module__ == "lmlab.benchsuite.busy_cpu"
    helped = subprocess.run([sys.executable, str(REPO / "benchmarks" / "busy_cpu.py"), "--help"], capture_output=True,
                            text=True, check=False, cwd=REPO)
    assert helped.returncode == 0 and "--baseline-src" in helped.stdout and str(results_dir()) in helped.stdout
    for command in ([str(REPO / "benchmarks" / "suite.py")], ["-m", "lmlab.benchsuite.suite"]):
        done = subprocess.run([sys.executable, *command, "nonsense", "{}"], capture_output=True, text=True,
                              check=False, cwd=REPO)
        assert done.returncode != 0 and "unknown command 'nonsense'" in done.stderr, done.stderr[-2000:]


def test_busy_cpu_benchmark_interleaves_variants_and_reports_paired_ratios(tmp_path, monkeypatch):
    """`lmlab.benchsuite.busy_cpu` with a stand-in for the smoke runs: each load's rounds run every variant, in reverse
    order every other round, under the background process only for `busy`; the children get no OpenMP or kernel
    settings from this process; ratios are medians of per-round ratios, with the issue's target on busy default."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # as `lmlab bench` sets for its own measurements
    monkeypatch.setenv("LMLAB_CPU_KERNELS", "0")
    calls, backgrounds = [], []
    walls = {"default": [12.0, 9.0, 11.0], "threads1": [10.0, 10.0, 10.0], "no-kernels": [30.0, 20.0, 25.0]}

    def runner(study, args, env, timeout):
        name = "threads1" if args == ["--threads", "1"] else "no-kernels" if env.get("LMLAB_CPU_KERNELS") else "default"
        assert "OMP_WAIT_POLICY" not in env and env.get("LMLAB_CPU_KERNELS") in (None, "0")
        assert (name == "no-kernels") == ("LMLAB_CPU_KERNELS" in env)
        done = sum(1 for c in calls if c[:2] == (study, name) and c[2] == len(backgrounds))
        calls.append((study, name, len(backgrounds)))
        return {"wall_s": walls[name][done % 3], "values": {"cfg": [1.0]}}

    @contextlib.contextmanager
    def background():
        backgrounds.append(True)
        yield

    results = busy.measure(["hylorada"], 3, ["busy", "idle"], log=lambda line: None, runner=runner,
                           background=background)
    names = [c[1] for c in calls]
    order = ["default", "threads1", "no-kernels"]
    assert names == (order + order[::-1] + order) * 2
    assert [c[2] for c in calls] == [1] * 9 + [1] * 9  # the busy rounds inside the one background, then idle
    assert len(backgrounds) == 1
    rows = {(r["load"], r["ours"], r["reference"]): r for r in results["ratios"]}
    busy_default = rows[("busy", "default", "threads1")]
    assert busy_default["ratio"] == pytest.approx(1.1) and busy_default["target"] == "<= 1.3" and busy_default["met"]
    assert rows[("idle", "no-kernels", "threads1")]["ratio"] == pytest.approx(2.5)
    assert rows[("idle", "default", "threads1")]["target"] is None
    assert results["loads"]["busy"]["hylorada"]["default"]["max_rel_diff_vs_threads1"] == 0.0

    monkeypatch.setattr(busy, "measure", lambda *a, **k: results)
    result, suite_rows = suite.bench_busy_cpu(tiny_settings())
    assert [(r.ours, r.reference, r.target) for r in suite_rows][:2] == [
        ("hylorada default (busy)", "threads1", "<= 1.3"), ("hylorada no-kernels (busy)", "threads1", None)]
    path = busy.run(["hylorada"], 3, ["busy", "idle"], tmp_path, log=lambda line: None)
    table = path.with_suffix(".md").read_text()
    assert path.name.endswith("-busy_cpu.json") and "| busy | hylorada | default | threads1 |" in table


def test_busy_cpu_benchmark_runs_only_the_chosen_variants_with_threads1():
    """`--variants default before-default`: those two and threads1 (the metric check's reference) run, the ratio of
    the pair is reported against the idle target, and an unknown name is one line naming the choices."""
    seen = []

    def runner(study, args, env, timeout):
        before = env.get("PYTHONPATH") == str(Path("/tmp/x").resolve())  # the baseline's sources, not the caller's
        name = ("before-" if before else "") + ("threads1" if args == ["--threads", "1"] else "default")
        seen.append(name)
        return {"wall_s": {"default": 10.0, "threads1": 11.0, "before-default": 12.5}[name], "values": {"c": [1.0]}}

    results = busy.measure(["hylorada"], 2, ["idle"], baseline_src="/tmp/x", log=lambda line: None, runner=runner,
                           only=["default", "before-default"])
    assert sorted(set(seen)) == ["before-default", "default", "threads1"] and len(seen) == 6
    rows = {(r["ours"], r["reference"]): r for r in results["ratios"]}
    assert set(rows) == {("default", "threads1"), ("default", "before-default")}
    pair = rows[("default", "before-default")]
    assert pair["ratio"] == pytest.approx(0.8) and pair["met"]
    with pytest.raises(SystemExit, match="unknown variant.*before-threads1"):
        busy.measure(["hylorada"], 1, ["idle"], log=lambda line: None, runner=runner, only=["before-threads1"])


def test_busy_cpu_pool_takes_every_paired_idle_round_of_several_files(tmp_path, capsys):
    """`--pool A.json B.json`: the median over all per-round default / before-default ratios of the idle load (busy
    rounds and files without the pair left out), with the interval of `median_interval`, against a hand count."""
    def result(default, before, busy=None):
        loads = {"idle": {"hylorada": {"default": {"wall_s": default}, "before-default": {"wall_s": before}}}}
        if busy:
            loads["busy"] = {"hylorada": {"default": {"wall_s": busy}, "before-default": {"wall_s": busy}}}
        return {"loads": loads}

    files = []
    for i, (d, b) in enumerate([([10, 11, 12], [10, 10, 10]), ([9, 10, 13, 10], [10, 10, 10, 10])]):
        files.append(tmp_path / f"r{i}.json")
        files[-1].write_text(json.dumps(result(d, b, busy=[99.0, 1.0] if i == 0 else None)))
    (tmp_path / "other.json").write_text(json.dumps({"loads": {"idle": {"mu": {"default": {"wall_s": [1.0]}}}}}))
    ratios = [1.0, 1.1, 1.2, 0.9, 1.0, 1.3, 1.0]
    [row] = busy.pooled(files + [tmp_path / "other.json"])
    assert row["study"] == "hylorada" and row["rounds"] == 7
    assert row["ratio"] == pytest.approx(statistics.median(ratios)) and row["interval"] == suite.median_interval(ratios)
    busy.main(["--pool", *map(str, files)])
    assert capsys.readouterr().out.startswith("hylorada: default / before-default 1.000, 95% interval of the median")


# ---------------------------------------------------------------------------------------------------
# Code paths of the optimisations


def test_fused_adamw_takes_the_steps_of_the_reference_loop():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(7))]
    reference = [nn.Parameter(p.detach().clone()) for p in params]
    fused = build_optimizer(params, 1e-2, torch.device("cpu"))
    loop = torch.optim.AdamW(reference, lr=1e-2, foreach=False)
    assert fused.defaults["fused"] and build_optimizer(params, 1e-2, torch.device("cuda")).defaults["fused"]
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, reference, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        loop.step()
    for p, q in zip(params, reference, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("layer_type", ["linear", "conv1d", "linear_no_bias"])
@pytest.mark.parametrize("rows", [6, 40])  # fewer / more rows than inputs: g folds into the output / the weight
def test_dora_folded_row_scale_matches_plain_autograd(layer_type, rows):
    torch.manual_seed(0)
    base = {"linear": lambda: nn.Linear(16, 12), "conv1d": lambda: Conv1D(12, 16),
            "linear_no_bias": lambda: nn.Linear(16, 12, bias=False)}[layer_type]().requires_grad_(False)
    config = HyLoRADAConfig(r=4, alpha=8, dropout=0.0, use_dora=True, position_bias=False, landmarks="none")
    layer = HyLoRADALinear(base, config)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
        layer.lora_magnitude.mul_(torch.rand(12) + 0.5)
    x = torch.randn(rows, 16, requires_grad=True)
    grad_out = torch.randn(rows, 12)
    wrt = [x, layer.lora_A, layer.lora_B, layer.lora_magnitude]
    fused = layer(x)
    plain = layer._forward_autograd(x, None, layer.row_norm())
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(fused, wrt, grad_out), torch.autograd.grad(plain, wrt, grad_out), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_runs_adapters_through_plain_autograd_close_to_fp32():
    assert _autocast(torch.device("cpu"), "bf16").fast_dtype == torch.bfloat16
    # without CUDA the GPU path's context is constructed disabled, with a warning; with CUDA it is enabled
    with contextlib.nullcontext() if torch.cuda.is_available() else pytest.warns(UserWarning):
        on_gpu = _autocast(torch.device("cuda"), "bf16")
    assert on_gpu.device == "cuda" and on_gpu.fast_dtype == torch.bfloat16
    assert on_gpu._enabled == torch.cuda.is_available()
    torch.manual_seed(0)
    config = HyLoRADAConfig(r=4, alpha=8, dropout=0.0, use_dora=True, position_bias=False, landmarks="none")
    layer = HyLoRADALinear(nn.Linear(32, 24).requires_grad_(False), config)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
    x = torch.randn(10, 32)
    full = layer(x)
    with _autocast(torch.device("cpu"), "bf16"):
        half = layer(x)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), full, rtol=0.05, atol=0.05)
    half.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (layer.lora_A, layer.lora_B))


def test_tiny_models_attend_through_sdpa():
    for arch in ("gpt2", "llama"):
        model = suite.base_model(arch, suite.TINY, seed=0)
        assert model.config._attn_implementation == "sdpa"  # flash / memory-efficient kernels when available


class _TokenMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.head = nn.Linear(16, 32)

    def forward(self, input_ids):
        return self.head(torch.tanh(self.embed(input_ids)))


@pytest.mark.slow
def test_compile_flag_trains_to_the_eager_losses():
    data = [{"input_ids": [(3 * i + j) % 32 for j in range(8)]} for i in range(16)]
    losses = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = _TokenMLP()
        cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-2, compile=compiled, log_every=1)
        result = train(model, data, cfg, seed=0, progress=False, device="cpu")  # float32: eager and compiled agree
        losses[compiled] = [h["loss"] for h in result.history]
    assert len(losses[True]) == 4
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
