"""Side-by-side performance benchmarks (lmlab issue 7): lmlab against peft and plain PyTorch.

Every comparison runs both sides in this one process, on the same weights and the same batch: warm-up
first, then interleaved repeats (A B, B A, A B, ... - the order flips every round so neither side always
runs first). A side's time is the median of its repeats; a comparison's ratio is the median over rounds
of that round's ratio, so slow drifts in machine load (other jobs on the cores) cancel within a round.
Peak memory is measured per variant in a fresh process on CPU (peak RSS: one process holding every
variant could not attribute it) and in-process on GPU (CUDA max allocated).

    1. train_gpt2 / train_llama: train step time and peak memory of lmlab LoRA, rsLoRA and DoRA against
       peft's, against the frozen-base floor (only the input embedding trainable) and full fine-tuning.
       lmlab's variants train as lmlab's engine trains them: on lmlab's attention (`lmlab.kernels`, the compiled
       CPU kernel); peft's, the floor and full fine-tuning on transformers' default SDPA, as a plain PyTorch or
       peft user runs them. Two more variants take the attention out of the comparison: `floor-lmlab-attn` (the
       floor on lmlab's attention: what lmlab's adapters add on the same attention) and `lmlab-lora-sdpa`
       (lmlab's LoRA on SDPA: lmlab's adapters against peft's alone).
    2. hylorada: the full HyLoRADA step (position bias + landmarks) against plain LoRA.
    3. inference: merged adapter against the base forward, unmerged against merged.
    4. eval_ppl: `evaluate_perplexity` (what `lmlab eval ppl` runs) against a plain per-window loop.
    5. mu: MU train step against the parameter-matched dense baseline (configs/mu/default.yaml sizes).
    6. smoke: wall time of `lmlab run hylorada --preset smoke`.
    7. busy_cpu: `lmlab run hylorada|mu --preset smoke` with default threads against `--threads 1` (and
       `LMLAB_CPU_KERNELS=0`) while another process runs torch matmuls on its default threads, and on an idle
       machine (`lmlab.benchsuite.busy_cpu`, fresh processes with the user's default OpenMP settings).

The suite runs in a child process (`python -m lmlab.benchsuite.suite run OPTIONS`, started by `lmlab bench`) whose
OpenMP threads wait passively: on a shared machine, threads that spin at every barrier while another process
holds the other core make two-thread step times swing by 5x; waiting passively keeps them within a few percent.
`python -m lmlab.benchsuite.suite memory SPEC` is the child process of one memory measurement. (`python
benchmarks/suite.py` in a checkout runs this module too.)
"""

from __future__ import annotations

import copy
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from lmlab.benchsuite import busy_cpu, source_checkout, write_results
from lmlab.cpu_share import torch_threads
from lmlab.stats import median_interval, paired_ratio

REPO = source_checkout()  # None outside a source checkout: the children then run in the current directory
BENCHMARKS = ("train_gpt2", "train_llama", "hylorada", "inference", "eval_ppl", "mu", "smoke", "busy_cpu")
TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"],
           "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
# (use_rslora, use_dora) of each adapter variant, the same on both sides
ADAPTERS = {"lora": (False, False), "rslora": (True, False), "dora": (False, True)}
TRAIN_VARIANTS = ("floor", "floor-lmlab-attn", "full", "peft-lora", "lmlab-lora", "lmlab-lora-sdpa", "peft-rslora",
                  "lmlab-rslora", "peft-dora", "lmlab-dora")
LR = 1e-4


@dataclass(frozen=True)
class Sizes:
    """Model and batch sizes. Defaults: the issue's tiny models (4 layers, width 256, vocab 4096, batch 4 x 512
    tokens, r=8); `TINY` keeps the harness test fast."""

    layers: int = 4
    hidden: int = 256
    heads: int = 4
    vocab: int = 4096
    batch: int = 4
    seq: int = 512
    rank: int = 8
    ppl_docs: int = 24  # documents of the eval_ppl benchmark (about 2.5 windows of 512 tokens each)
    ppl_sentences: int = 80


TINY = Sizes(layers=2, hidden=64, heads=2, vocab=384, batch=2, seq=32, rank=4, ppl_docs=4, ppl_sentences=6)


@dataclass
class Settings:
    quick: bool = False
    threads: int = 1
    sizes: Sizes = field(default_factory=Sizes)
    seed: int = 0
    memory: bool = True  # peak memory per variant (a fresh process each on CPU)

    @property
    def device(self) -> torch.device:
        """The GPU where CUDA is available, unless LMLAB_DEVICE=cpu keeps the benchmarks on the CPU."""
        from lmlab.engine import distributed as D

        return D.device()

    def rounds(self, full: int) -> tuple[int, int]:
        """(warm-up runs per side, interleaved rounds)."""
        return (1, 3) if self.quick else (3, full)


# ---------------------------------------------------------------------------------------------------
# Timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(cases: dict[str, Callable[[], object]], warmup: int, rounds: int,
                device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each case: `warmup` untimed calls each, then `rounds` rounds that call every case
    once, in reverse order every other round. The garbage collector is held off while timing."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    names = list(cases)
    times: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                synchronize(device)
                start = time.perf_counter()
                cases[name]()
                synchronize(device)
                times[name].append(time.perf_counter() - start)
    finally:
        gc.enable()
    return times


@dataclass
class Row:
    """One line of the results table."""

    benchmark: str
    ours: str
    reference: str
    metric: str  # what the values are, e.g. "s/step" or "tokens/s"
    ours_value: float
    reference_value: float
    ratio: float
    target: str | None = None  # e.g. "<= 0.85"
    met: bool | None = None  # the median ratio meets the target
    interval: tuple[float, float] | None = None  # 95% confidence interval of the median ratio over rounds

    @property
    def within_noise(self) -> bool:
        """The target lies inside the ratio's confidence interval: this run cannot tell met from missed."""
        if self.target is None or self.interval is None:
            return False
        bound = float(self.target.split()[-1])
        return self.interval[0] <= bound <= self.interval[1]


def compare(benchmark: str, ours: str, reference: str, times: dict[str, list[float]], target: float | None = None,
            metric: str = "s/step", higher_is_better: bool = False) -> Row:
    """A row for `ours` against `reference` from interleaved measurements (times, or rates with
    `higher_is_better`); the target is a maximum ratio, or a minimum one for rates."""
    ratio = paired_ratio(times[ours], times[reference])
    interval = median_interval([a / b for a, b in zip(times[ours], times[reference], strict=True)])
    op = ">=" if higher_is_better else "<="
    met = None if target is None else (ratio >= target if higher_is_better else ratio <= target)
    return Row(benchmark, ours, reference, metric, statistics.median(times[ours]), statistics.median(times[reference]),
               ratio, None if target is None else f"{op} {target:g}", met, interval)


# ---------------------------------------------------------------------------------------------------
# Models and train steps


def base_model(arch: str, sizes: Sizes, seed: int) -> nn.Module:
    """The tiny base (tied embeddings, no dropout), deterministic for a seed."""
    from lmlab.models.tiny import TinyModelConfig, build_tiny

    config = TinyModelConfig(arch=arch, hidden_size=sizes.hidden, num_layers=sizes.layers, num_heads=sizes.heads,
                             context=sizes.seq)
    return build_tiny(config, sizes.vocab, bos_id=1, eos_id=2, pad_id=0, seed=seed)


def train_variant(base: nn.Module, arch: str, variant: str, rank: int) -> nn.Module:
    """A copy of `base` set up for `variant` (see TRAIN_VARIANTS and the module doc)."""
    from lmlab.kernels import use_kernel_attention

    model = copy.deepcopy(base)
    if variant == "full":
        return model
    if variant.startswith("floor"):  # the cost any adapter pays: the backward runs through the whole frozen model
        model.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)
        if variant == "floor-lmlab-attn":
            use_kernel_attention(model)
        return model
    library, _, kind = variant.partition("-")
    kind, _, attention = kind.partition("-")
    use_rslora, use_dora = ADAPTERS[kind]
    if library == "peft":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS[arch], lora_dropout=0.0,
                            use_rslora=use_rslora, use_dora=use_dora, fan_in_fan_out=arch == "gpt2")
        return get_peft_model(model, config)
    model = apply_lmlab(model, arch, rank, use_rslora=use_rslora, use_dora=use_dora)
    if attention != "sdpa":  # as lmlab's engine trains it (lmlab.engine.train)
        use_kernel_attention(model)
    return model


def apply_lmlab(model: nn.Module, arch: str, rank: int, **options) -> nn.Module:
    """lmlab's adapter with peft's settings (alpha = 2r, no dropout); position parts off unless given."""
    from lmlab.hylorada import HyLoRADAConfig, apply_hylorada

    settings = {"position_bias": False, "landmarks": "none", **options}
    config = HyLoRADAConfig(r=rank, alpha=2 * rank, dropout=0.0, target_modules=TARGETS[arch], **settings)
    return apply_hylorada(model, config)


def train_step(model: nn.Module, batch: torch.Tensor, device: torch.device) -> Callable[[], float]:
    """One optimizer step as lmlab's engine takes it (forward, the engine's `causal_lm_loss` as a mean over
    tokens, backward, AdamW, zero_grad) as a closure. Every side of a comparison uses it."""
    from lmlab.engine.train import build_optimizer, causal_lm_loss

    model.to(device).train()
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], LR, device)
    inputs = {"input_ids": batch, "labels": batch}

    def step() -> float:
        out = causal_lm_loss(model, inputs)
        loss = out.total / out.weight
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def token_batch(sizes: Sizes, vocab: int, seed: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, vocab, (sizes.batch, sizes.seq), generator=generator).to(device)


def attention_of(model: nn.Module) -> str:
    """The model's attention implementation, and for lmlab's whether its compiled CPU kernel runs here."""
    from lmlab.kernels import kernel_available
    from lmlab.kernels.attention import HF_NAME

    name = model.config._attn_implementation
    return f"{name} ({'kernel' if kernel_available() else 'no kernel: SDPA'})" if name == HF_NAME else name


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------------
# Peak memory


def peak_memory(spec: dict, settings: Settings) -> dict:
    """Peak memory of a few train steps of one variant: a fresh child process on CPU (peak RSS), in-process on GPU.
    Empty when the settings turn memory off."""
    if not settings.memory:
        return {}
    if settings.device.type == "cuda":
        return measure_memory(spec)
    command = [sys.executable, "-m", "lmlab.benchsuite.suite", "memory", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement of {spec['variant']} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_memory(spec: dict) -> dict:
    """Build the variant in `spec`, run `steps` train steps, report peak memory in MB.

    `peak_mb`: the peak during the steps (CPU: resident set size; GPU: CUDA max allocated); `train_mb`: what the
    steps add to the built model (activations, gradients, optimizer state).
    """
    settings = Settings(threads=spec["threads"], sizes=Sizes(**spec["sizes"]), seed=spec["seed"])
    torch.set_num_threads(settings.threads)
    device = settings.device
    model, batch = memory_case(spec, settings)
    step = train_step(model, batch, device)

    def steps() -> None:
        for _ in range(spec["steps"]):
            step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        steps()
        peak = torch.cuda.max_memory_allocated(device)
    else:
        before = psutil.Process().memory_info().rss
        peak = rss_peak_during(steps)
    return {"peak_mb": peak / 2**20, "train_mb": (peak - before) / 2**20}


def rss_peak_during(run: Callable[[], None]) -> int:
    """Peak RSS in bytes while `run()` executes: Linux's exact high-water mark, reset first (clear_refs 5),
    else lmlab's sampled peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        from lmlab.engine.train import PeakMemory

        with PeakMemory(torch.device("cpu"), interval_s=0.002) as memory:
            run()
        return memory.peak
    run()
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def memory_case(spec: dict, settings: Settings) -> tuple[nn.Module, torch.Tensor]:
    if spec["kind"] == "mu":
        configs = mu_configs()
        return mu_model(spec["variant"], configs, settings.seed), mu_batch(configs, settings.seed, settings.device)
    arch, sizes = spec["arch"], settings.sizes
    base = base_model(arch, sizes, settings.seed)
    return (train_variant(base, arch, spec["variant"], sizes.rank),
            token_batch(sizes, sizes.vocab, settings.seed, settings.device))


# ---------------------------------------------------------------------------------------------------
# 1. Train step: lmlab vs peft vs the floor


def bench_train(arch: str, settings: Settings) -> tuple[dict, list[Row]]:
    sizes, device = settings.sizes, settings.device
    base = base_model(arch, sizes, settings.seed)
    batch = token_batch(sizes, sizes.vocab, settings.seed, device)
    models = {v: train_variant(base, arch, v, sizes.rank) for v in TRAIN_VARIANTS}
    steps = {v: train_step(m, batch, device) for v, m in models.items()}
    # Fairness check: adapters start as the identity (B = 0), so every variant starts from the same loss.
    first_loss = {v: step() for v, step in steps.items()}
    times = interleaved(steps, *settings.rounds(31), device)
    name = f"train_{arch}"
    variants = {}
    for v in TRAIN_VARIANTS:
        memory = peak_memory({"kind": "train", "arch": arch, "variant": v, "sizes": asdict(sizes),
                              "seed": settings.seed, "threads": settings.threads, "steps": 3}, settings)
        variants[v] = {"median_s": statistics.median(times[v]), "times_s": times[v], "first_loss": first_loss[v],
                       "trainable_params": trainable(models[v]), "attention": attention_of(models[v]), **memory}
    rows = []
    for kind in ADAPTERS:  # as each library trains
        target = 0.75 if kind == "dora" else 0.85
        rows.append(compare(name, f"lmlab-{kind}", f"peft-{kind}", times, target))
    rows.append(compare(name, "lmlab-lora-sdpa", "peft-lora", times))  # the adapters alone, both on SDPA
    for kind in ADAPTERS:  # what lmlab's adapters add to the floor on the same attention
        rows.append(compare(name, f"lmlab-{kind}", "floor-lmlab-attn", times, None if kind == "dora" else 1.12))
    rows.append(compare(name, "lmlab-lora-sdpa", "floor", times))
    rows += [compare(name, f"peft-{kind}", "floor", times) for kind in ADAPTERS]
    rows += [compare(name, "floor-lmlab-attn", "floor", times), compare(name, "full", "floor", times)]
    result = {"model": {"arch": arch, **asdict(sizes)}, "targets": TARGETS[arch], "variants": variants,
              "same_first_loss": max(first_loss.values()) - min(first_loss.values()) < 1e-4}
    return result, rows


# ---------------------------------------------------------------------------------------------------
# 2. Full HyLoRADA vs plain LoRA


def bench_hylorada(settings: Settings) -> tuple[dict, list[Row]]:
    from lmlab.kernels import use_kernel_attention

    sizes, device = settings.sizes, settings.device
    base = base_model("gpt2", sizes, settings.seed)
    batch = token_batch(sizes, sizes.vocab, settings.seed, device)
    # rsLoRA (HyLoRADA's adapter) alone vs rsLoRA + position bias + position-adaptive landmarks
    models = {"lmlab-rslora": apply_lmlab(copy.deepcopy(base), "gpt2", sizes.rank, use_rslora=True),
              "hylorada": apply_lmlab(copy.deepcopy(base), "gpt2", sizes.rank, use_rslora=True, position_bias=True,
                                      landmarks="position_adaptive")}
    for model in models.values():  # as lmlab's engine trains them
        use_kernel_attention(model)
    steps = {name: train_step(m, batch, device) for name, m in models.items()}
    times = interleaved(steps, *settings.rounds(31), device)
    result = {"variants": {name: {"median_s": statistics.median(t), "times_s": t, "trainable_params": trainable(m)}
                           for (name, t), m in zip(times.items(), models.values(), strict=True)}}
    return result, [compare("hylorada", "hylorada", "lmlab-rslora", times, 1.10)]


# ---------------------------------------------------------------------------------------------------
# 3. Inference: merged vs base, unmerged vs merged


def bench_inference(settings: Settings) -> tuple[dict, list[Row]]:
    from lmlab.hylorada import merge_adapter

    sizes, device = settings.sizes, settings.device
    base = base_model("gpt2", sizes, settings.seed).to(device).eval()
    batch = token_batch(sizes, sizes.vocab, settings.seed, device)
    unmerged = apply_lmlab(copy.deepcopy(base), "gpt2", sizes.rank, use_rslora=True).eval()
    generator = torch.Generator().manual_seed(settings.seed + 2)
    with torch.no_grad():  # a trained-looking adapter, so that merging changes the weights
        for name, param in unmerged.named_parameters():
            if name.endswith("lora_B"):
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    merged = merge_adapter(copy.deepcopy(unmerged)).eval()
    models = {"base": base, "unmerged": unmerged, "merged": merged}

    def forward(model: nn.Module) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.inference_mode():
                return model(input_ids=batch).logits
        return run

    cases = {name: forward(m) for name, m in models.items()}
    max_diff = (cases["merged"]() - cases["unmerged"]()).abs().max().item()
    times = interleaved(cases, *settings.rounds(61), device)
    result = {"variants": {name: {"median_s": statistics.median(t), "times_s": t} for name, t in times.items()},
              "merged_vs_unmerged_max_abs_diff": max_diff}
    return result, [compare("inference", "merged", "base", times, 1.03, "s/forward"),
                    compare("inference", "unmerged", "merged", times, None, "s/forward")]


# ---------------------------------------------------------------------------------------------------
# 4. Perplexity evaluation vs a plain per-window loop


def bench_eval_ppl(settings: Settings) -> tuple[dict, list[Row]]:
    from lmlab.data import generators
    from lmlab.data.tokenizer import train_bpe_tokenizer
    from lmlab.eval.perplexity import evaluate_perplexity, rolling_windows
    from lmlab.models.hf import prefix_token_id

    sizes, device = settings.sizes, settings.device
    docs = generators.corpus_documents(settings.seed, sizes.ppl_docs, sentences_per_doc=sizes.ppl_sentences)
    tokenizer = train_bpe_tokenizer(generators.corpus_documents(settings.seed + 1, 200), sizes.vocab)
    model = base_model("gpt2", Sizes(**{**asdict(sizes), "vocab": len(tokenizer)}), settings.seed).to(device).eval()
    max_length = sizes.seq
    token_docs = tokenizer(docs, add_special_tokens=False)["input_ids"]
    windows = [w for toks in token_docs for w in rolling_windows(toks, prefix_token_id(tokenizer), max_length)]
    outcome: dict[str, tuple[float, int]] = {}

    def plain_loop() -> None:
        """What a user would write: one window at a time, the NLL of its scored tokens."""
        nll, count = 0.0, 0
        with torch.inference_mode():
            for w in windows:
                logits = model(input_ids=torch.tensor([w.inputs], device=device)).logits[0]
                targets = torch.tensor(w.targets[-w.scored:], device=device)
                nll += F.cross_entropy(logits[-w.scored:], targets, reduction="sum").item()
                count += w.scored
        outcome["plain_loop"] = (nll, count)

    def lmlab_eval() -> None:
        """`lmlab eval ppl`: evaluate_perplexity with its default batch of 8 windows, under inference mode."""
        with torch.inference_mode():
            result = evaluate_perplexity(model, docs, tokenizer, max_length, batch_size=8)
        outcome["lmlab"] = (result["nll_sum"], result["tokens"])

    times = interleaved({"lmlab": lmlab_eval, "plain_loop": plain_loop}, *settings.rounds(11), device)
    tokens = outcome["lmlab"][1]
    rates = {name: [tokens / t for t in ts] for name, ts in times.items()}  # tokens/s: higher is better
    ppl = {name: math.exp(nll / count) for name, (nll, count) in outcome.items()}
    result = {"documents": len(docs), "windows": len(windows), "tokens": tokens, "max_length": max_length,
              "batch_size": 8, "ppl": ppl, "same_tokens": outcome["plain_loop"][1] == tokens,
              "variants": {name: {"median_tokens_per_s": statistics.median(r), "tokens_per_s": r}
                           for name, r in rates.items()}}
    return result, [compare("eval_ppl", "lmlab", "plain_loop", rates, 1.0, "tokens/s", higher_is_better=True)]


# ---------------------------------------------------------------------------------------------------
# 5. MU vs the parameter-matched dense baseline


def mu_configs() -> dict:
    """The MU study's default preset (configs/mu/default.yaml): mu-sota and its parameter-matched dense baseline."""
    from lmlab.config import preset_path
    from lmlab.mu import MUConfig, match_dense

    preset = yaml.safe_load(preset_path("mu", "default").read_text())
    mu = MUConfig.preset("mu-sota", vocab_size=preset["vocab_size"], max_seq_len=preset["max_seq_len"],
                         n_layers=preset["mu_sota"]["n_layers"])
    return {"mu": mu, "dense": match_dense(mu, preset["match"]["count"]), "batch_size": preset["train"]["batch_size"]}


def mu_model(name: str, configs: dict, seed: int) -> nn.Module:
    from lmlab.mu import DenseModel, MUModel

    torch.manual_seed(seed)
    return MUModel(configs["mu"]) if name == "mu" else DenseModel(configs["dense"])


def mu_batch(configs: dict, seed: int, device: torch.device) -> torch.Tensor:
    mu = configs["mu"]
    return token_batch(Sizes(batch=configs["batch_size"], seq=mu.max_seq_len), mu.vocab_size, seed, device)


def bench_mu(settings: Settings) -> tuple[dict, list[Row]]:
    from lmlab.mu import count_parameters

    device = settings.device
    configs = mu_configs()
    models = {name: mu_model(name, configs, settings.seed) for name in ("mu", "dense")}
    batch = mu_batch(configs, settings.seed, device)
    steps = {name: train_step(m, batch, device) for name, m in models.items()}
    times = interleaved(steps, *settings.rounds(31), device)
    variants = {}
    for name, model in models.items():
        memory = peak_memory({"kind": "mu", "variant": name, "sizes": asdict(settings.sizes), "seed": settings.seed,
                              "threads": settings.threads, "steps": 3}, settings)
        variants[name] = {"median_s": statistics.median(times[name]), "times_s": times[name],
                          "parameters": count_parameters(model), **memory}
    result = {"preset": "configs/mu/default.yaml: mu-sota and the dense baseline matched to it",
              "batch_size": configs["batch_size"], "variants": variants,
              "configs": {name: m.config.model_dump() for name, m in models.items()}}
    return result, [compare("mu", "mu", "dense", times, 2.0)]


# ---------------------------------------------------------------------------------------------------
# 6. The smoke study, end to end


def bench_smoke(settings: Settings) -> tuple[dict, list[Row]]:
    """Wall time of `lmlab run hylorada --preset smoke` in a fresh process (tiny base from the model cache,
    pretrained first when it is not there yet)."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "lmlab.cli", "run", "hylorada", "--preset", "smoke", "--out",
                   str(Path(tmp) / "run"), "--quiet"]
        env = {**os.environ, "OMP_NUM_THREADS": str(settings.threads)}
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO, env=env)
        wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(command[2:])}` failed:\n{done.stderr[-2000:]}")
    return {"command": "lmlab run hylorada --preset smoke", "wall_s": wall}, []


# ---------------------------------------------------------------------------------------------------
# 7. Smoke studies on a busy CPU


def bench_busy_cpu(settings: Settings, **measure_options) -> tuple[dict, list[Row]]:
    """`lmlab.benchsuite.busy_cpu`'s measurement (3 interleaved rounds, 1 with --quick) as rows: default / threads1
    under load (target <= 1.3) and idle, LMLAB_CPU_KERNELS=0 / threads1."""
    result = busy_cpu.measure(list(busy_cpu.STUDIES), 1 if settings.quick else 3, ["busy", "idle"],
                          log=lambda line: print(line, file=sys.stderr), **measure_options)
    rows = []
    for r in result["ratios"]:
        times = result["loads"][r["load"]][r["study"]]
        per_round = [a / b for a, b in zip(times[r["ours"]]["wall_s"], times[r["reference"]]["wall_s"], strict=True)]
        rows.append(Row("busy_cpu", f"{r['study']} {r['ours']} ({r['load']})", r["reference"], "s (smoke run)",
                        r["ours_s"], r["reference_s"], r["ratio"], r["target"], r["met"], median_interval(per_round)))
    return result, rows


# ---------------------------------------------------------------------------------------------------
# The run


def machine(threads: int) -> dict:
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    import peft
    import transformers

    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads, "load_average_start": os.getloadavg(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
            "device": "cuda" if torch.cuda.is_available() else "cpu", "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


RUNNERS: dict[str, Callable[[Settings], tuple[dict, list[Row]]]] = {
    "train_gpt2": lambda s: bench_train("gpt2", s),
    "train_llama": lambda s: bench_train("llama", s),
    "hylorada": bench_hylorada,
    "inference": bench_inference,
    "eval_ppl": bench_eval_ppl,
    "mu": bench_mu,
    "smoke": bench_smoke,
    "busy_cpu": bench_busy_cpu,
}


def run(settings: Settings, only: list[str] | None, out: Path, log: Callable[[str], None] = print) -> Path:
    """Run the benchmarks (all, or `only`), write `<date>.json` and `<date>.md` into `out` (`<date>T<time>.*` when
    that day already has a run); returns the JSON path."""
    names = list(only) if only else list(BENCHMARKS)
    with torch_threads(settings.threads):  # the same on both sides of every comparison
        started = datetime.now()
        results: dict = {"date": started.date().isoformat(), "started": started.isoformat(timespec="seconds"),
                         "machine": machine(settings.threads),
                         "settings": {"quick": settings.quick, "seed": settings.seed,
                                      "sizes": asdict(settings.sizes), "dtype": "float32", "lr": LR,
                                      "memory": settings.memory},
                         "benchmarks": {}, "rows": []}
        for name in names:
            log(f"bench {name} ...")
            begun = time.perf_counter()
            result, rows = RUNNERS[name](settings)
            result["wall_s"] = time.perf_counter() - begun
            results["benchmarks"][name] = result
            results["rows"] += [asdict(r) for r in rows]
            for r in rows:
                log(f"  {format_row(r)}")
    results["machine"]["load_average_end"] = os.getloadavg()
    results["finished"] = datetime.now().isoformat(timespec="seconds")
    suffix = "-quick" if settings.quick else "" if only is None else "-" + "-".join(names)
    return write_results(out, started, suffix, results, markdown(results))


def format_row(row: Row) -> str:
    interval = f" [{row.interval[0]:.3f}, {row.interval[1]:.3f}]" if row.interval else ""
    noise = ", within noise" if row.within_noise else ""
    target = f" (target {row.target}: {'met' if row.met else 'MISSED'}{noise})" if row.target else ""
    return f"{row.ours} vs {row.reference}: {row.ratio:.3f}{interval}{target}"


def markdown(results: dict) -> str:
    """The results table (and per-variant time and memory of the train steps) as markdown."""
    m = results["machine"]
    lines = [f"Benchmarks of {results['started']} on {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch "
             f"threads, {m['device']}; load average {m['load_average_start'][0]:.1f} at start, "
             f"{m['load_average_end'][0]:.1f} at end); torch {m['torch']}, transformers {m['transformers']}, "
             f"peft {m['peft']}. Ratio: median over interleaved rounds of ours / reference (tokens/s for eval_ppl); "
             "95% CI: distribution-free interval of that median (order statistics of the per-round ratios). "
             "'met' compares the median with the target; 'within noise': the target lies inside the interval, "
             "so this run cannot tell met from missed.",
             "", "| benchmark | ours | reference | ours | reference | ratio | 95% CI | target | met |",
             "|---|---|---|---:|---:|---:|---:|---:|:-:|"]
    lines += [table_line(row, lambda v, r: _value(v, r.metric)) for row in results["rows"]]
    trains = {k: v for k, v in results["benchmarks"].items() if k.startswith("train_") or k == "mu"}
    if trains:
        lines += ["", "| model | variant | attention | trainable params | step (s) | peak memory (MB) "
                      "| added by training (MB) |", "|---|---|---|---:|---:|---:|---:|"]
        for name, bench in trains.items():
            for variant, v in bench["variants"].items():
                params = v.get("trainable_params", v.get("parameters", {}).get("total"))
                memory = [f"{v[k]:.0f}" if k in v else "-" for k in ("peak_mb", "train_mb")]
                lines.append(f"| {name} | {variant} | {v.get('attention', '')} | {params:,} | {v['median_s']:.3f} "
                             f"| {' | '.join(memory)} |")
    smoke = results["benchmarks"].get("smoke")
    if smoke:
        lines += ["", f"`{smoke['command']}`: {smoke['wall_s']:.1f} s wall time."]
    return "\n".join(lines) + "\n"


def table_line(row: dict, value: Callable) -> str:
    """One row of a results table (a `Row` as saved in the results JSON); `value(v, row)` formats a measurement."""
    r = Row(**{**row, "interval": tuple(row["interval"]) if row.get("interval") else None})
    met = "" if r.met is None else "yes" if r.met else "**no**"
    if r.within_noise:
        met += " (within noise)"
    interval = f"{r.interval[0]:.3f}-{r.interval[1]:.3f}" if r.interval else ""
    return (f"| {r.benchmark} | {r.ours} | {r.reference} | {value(r.ours_value, r)} | {value(r.reference_value, r)} "
            f"| {r.ratio:.3f} | {interval} | {r.target or ''} | {met} |")


def _value(value: float, metric: str) -> str:
    return f"{value:,.0f} {metric}" if metric == "tokens/s" else f"{value:.3f} {metric}"


def main(command: str, argument: str) -> None:
    """The entry point of child processes: `run OPTIONS` (the whole suite, progress on stderr, the results path
    on stdout) and `memory SPEC` (one peak-memory measurement, JSON on stdout)."""
    options = json.loads(argument)
    # peft calls transformers APIs that v5 renamed: their deprecation notices are not benchmark results
    warnings.filterwarnings("ignore", category=FutureWarning)
    if command == "memory":
        print(json.dumps(measure_memory(options)))
    elif command == "run":
        settings = Settings(quick=options["quick"], threads=options["threads"])
        print(run(settings, options["only"], Path(options["out"]), log=lambda line: print(line, file=sys.stderr)))
    else:
        raise SystemExit(f"unknown command {command!r}: use run or memory")


if __name__ == "__main__":
    main(*sys.argv[1:3])
