"""`lmlab bench --gpu` (automatic where CUDA is available): lmlab's adapters against peft's on one NVIDIA GPU.

Two model shapes, random init (no hub), bf16 base weights, bf16 autocast, rank 16 on every linear layer of the blocks:
GPT-2 124M (batch 8 x 1024) and a 1.1B Llama (TinyLlama's shape: 22 layers, width 2048, GQA 32/4 heads, MLP 5632,
vocab 32000; batch 4 x 2048). Variants:

    floor        the frozen base with only the input embedding trainable, the full-logits loss (what any adapter pays)
    floor-lmlab  the same on lmlab's engine: the chunked LM-head loss (`train.loss_chunk`, lmlab.engine.lmhead)
    peft-lora    peft's LoRA, the full-logits loss (as a peft user trains it)
    peft-dora    peft's DoRA, likewise
    lmlab-lora   lmlab's LoRA as lmlab's engine trains it (float32 adapters on the bf16 base, chunked loss)
    lmlab-dora   lmlab's DoRA, likewise
    hylorada     full HyLoRADA (rsLoRA + position bias + position-adaptive landmarks), likewise

Step times are interleaved in one process as in the CPU suite (lmlab.benchsuite.suite: warm-up, then rounds in
alternating order; ratios are medians of per-round ratios with distribution-free 95% intervals). Peak CUDA memory is
measured per variant in isolation: only that variant's model on the GPU, `torch.cuda.reset_peak_memory_stats` after
a first step, the peak of the next two. The long-context probe trains a Llama-3-8B-shaped model (bf16, vocab 128256)
with full HyLoRADA, batch 1, gradient checkpointing and the chunked loss, one step per sequence length (`--lengths`),
and reports the peak memory or that it ran out of memory.

Everything GPU-side runs only where CUDA is available; argument parsing and the results table are plain Python
(tested on CPU). `python -m lmlab.benchsuite.gpu run OPTIONS` is the child process `lmlab bench --gpu` starts.
"""

from __future__ import annotations

import copy
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from torch import nn

from lmlab.benchsuite import write_results
from lmlab.benchsuite.suite import Row, compare, format_row, interleaved, table_line
from lmlab.errors import LmlabError, is_out_of_memory

RANK = 16
LR = 1e-4
MODELS: dict[str, dict] = {
    "gpt2-124m": {"arch": "gpt2", "batch": 8, "seq": 1024,
                  "config": {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12}},
    "llama-1.1b": {"arch": "llama", "batch": 4, "seq": 2048,
                   "config": {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
                              "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
                              "max_position_embeddings": 2048}},
}
LONG_MODEL = {"name": "llama-3-8b", "arch": "llama",
              "config": {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                         "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                         "rope_theta": 500000.0}}
TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"],
           "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
VARIANTS = ("floor", "floor-lmlab", "peft-lora", "peft-dora", "lmlab-lora", "lmlab-dora", "hylorada")
LMLAB_ENGINE = {"floor-lmlab", "lmlab-lora", "lmlab-dora", "hylorada"}  # trained with lmlab's chunked loss
# (ours, reference, metric, target ratio or None, models the target applies to); issue 20's targets
COMPARISONS = [
    ("lmlab-lora", "peft-lora", "s/step", 0.6, ("llama-1.1b",)),
    ("lmlab-lora", "peft-lora", "GiB", 0.6, ("llama-1.1b",)),
    ("lmlab-lora", "floor-lmlab", "s/step", 1.05, None),
    ("lmlab-dora", "peft-dora", "s/step", 0.5, None),
    ("lmlab-dora", "peft-dora", "GiB", None, None),
    ("hylorada", "lmlab-lora", "s/step", 1.05, None),
    ("hylorada", "lmlab-lora", "GiB", None, None),
    ("floor-lmlab", "floor", "s/step", None, None),
    ("floor-lmlab", "floor", "GiB", None, None),
    ("peft-lora", "floor", "s/step", None, None),
]
DEFAULT_LENGTHS = (32_768, 65_536, 131_072)


@dataclass
class GpuSettings:
    quick: bool = False
    models: list[str] = field(default_factory=lambda: list(MODELS))
    lengths: list[int] = field(default_factory=lambda: list(DEFAULT_LENGTHS))  # empty: no long-context probe
    seed: int = 0

    def rounds(self) -> tuple[int, int]:
        """(warm-up steps per variant, interleaved rounds): 6 rounds is the fewest with a 95% interval."""
        return (1, 3) if self.quick else (2, 7)


def parse_lengths(text: str | None) -> list[int]:
    """`--lengths 32768,65536` or `32k,64k,128k` (k = 1024); `none` or an empty string: no long-context probe."""
    if text is None:
        return list(DEFAULT_LENGTHS)
    if text.strip().lower() in ("", "none"):
        return []
    lengths = []
    for part in text.split(","):
        item = part.strip().lower()
        scale = 1024 if item.endswith("k") else 1
        digits = item[:-1] if item.endswith("k") else item
        if not digits.isdigit() or int(digits) * scale < 2:
            raise LmlabError(f"--lengths takes sequence lengths like 32768,65536 or 32k,128k; got {part.strip()!r}")
        lengths.append(int(digits) * scale)
    return lengths


def options(quick: bool, lengths: str | None, models: list[str] | None) -> dict:
    """The child's options from the command line (checked here, before anything starts)."""
    unknown = sorted(set(models or ()) - set(MODELS))
    if unknown:
        raise LmlabError(f"unknown GPU benchmark model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    return {"quick": quick, "models": list(models or MODELS), "lengths": parse_lengths(lengths)}


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise LmlabError(f"lmlab bench --gpu needs a CUDA GPU, and torch {torch.__version__} sees none; run "
                         "`lmlab bench` for the CPU benchmarks")


# ---------------------------------------------------------------------------------------------------
# Models and steps (CUDA)


def build_base(arch: str, config: dict, seed: int, device: torch.device) -> nn.Module:
    """A randomly initialised model in bf16, built on the GPU (no float32 copy on the way)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cls, cfg_cls = (GPT2LMHeadModel, GPT2Config) if arch == "gpt2" else (LlamaForCausalLM, LlamaConfig)
    extra = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0} if arch == "gpt2" else {}
    hf_config = cfg_cls(**config, **extra, attn_implementation="sdpa")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = cls(hf_config)
    finally:
        torch.set_default_dtype(previous)
    return model


def make_variant(base: nn.Module, arch: str, variant: str, max_positions: int) -> nn.Module:
    """`base` (modified in place) set up as `variant`."""
    if variant.startswith("floor"):
        base.requires_grad_(False)
        base.get_input_embeddings().weight.requires_grad_(True)
        return base
    if variant.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS[arch], lora_dropout=0.0,
                            use_dora=variant == "peft-dora", fan_in_fan_out=arch == "gpt2")
        return get_peft_model(base, config)
    from lmlab.hylorada import HyLoRADAConfig, apply_hylorada

    if variant == "hylorada":
        config = HyLoRADAConfig(r=RANK, alpha=2 * RANK, dropout=0.0, target_modules=TARGETS[arch])
    else:
        config = HyLoRADAConfig(r=RANK, alpha=2 * RANK, dropout=0.0, target_modules=TARGETS[arch], use_rslora=False,
                                use_dora=variant == "lmlab-dora", position_bias=False, landmarks="none")
    return apply_hylorada(base, config, max_positions=max_positions)


def make_step(model: nn.Module, batch: torch.Tensor, lmlab_engine: bool) -> Callable[[], float]:
    """One optimizer step under bf16 autocast: lmlab's variants with lmlab's chunked loss, the others with the full
    logits (`causal_lm_loss`'s plain path, what `model(labels=...)` computes)."""
    from lmlab.engine.losses import LossSettings, causal_lm_loss
    from lmlab.engine.train import build_optimizer

    device = batch.device
    model.train()
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], LR, device)
    settings = LossSettings(chunk="auto" if lmlab_engine else 0)
    inputs = {"input_ids": batch, "labels": batch}

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = causal_lm_loss(model, inputs, settings)
        loss = out.total.float() / out.weight
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def release() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def peak_memory(spec: dict, variant: str, seed: int, device: torch.device) -> dict:
    """Peak CUDA memory of `variant` alone on the GPU: built fresh, one step (optimizer state), then the peak of two."""
    release()
    base = build_base(spec["arch"], spec["config"], seed, device)
    model = make_variant(base, spec["arch"], variant, spec["seq"])
    step = make_step(model, token_batch(spec, seed, device), variant in LMLAB_ENGINE)
    try:
        step()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        step()
        torch.cuda.synchronize(device)
        return {"peak_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    except torch.OutOfMemoryError:
        return {"peak_gib": None, "oom": True}
    finally:
        del model, base, step
        release()


def token_batch(spec: dict, seed: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, spec["config"]["vocab_size"], (spec["batch"], spec["seq"]), generator=generator).to(device)


def bench_model(name: str, settings: GpuSettings, device: torch.device, log: Callable[[str], None]) -> dict:
    """Interleaved step times of every variant, then each variant's peak memory in isolation."""
    spec = MODELS[name]
    base = build_base(spec["arch"], spec["config"], settings.seed, device)
    batch = token_batch(spec, settings.seed, device)
    models = {v: make_variant(copy.deepcopy(base), spec["arch"], v, spec["seq"]) for v in VARIANTS}
    del base
    steps = {v: make_step(m, batch, v in LMLAB_ENGINE) for v, m in models.items()}
    first_loss = {v: step() for v, step in steps.items()}
    times = interleaved(steps, *settings.rounds(), device)
    trainable = {v: sum(p.numel() for p in m.parameters() if p.requires_grad) for v, m in models.items()}
    del models, steps
    release()
    variants = {}
    for v in VARIANTS:
        variants[v] = {"median_s": statistics.median(times[v]), "times_s": times[v], "first_loss": first_loss[v],
                       "trainable_params": trainable[v], **peak_memory(spec, v, settings.seed, device)}
        log(f"  {name} {v}: {variants[v]['median_s']:.4f} s/step, peak {_gib(variants[v].get('peak_gib'))}")
    return {"model": {"arch": spec["arch"], "batch": spec["batch"], "seq": spec["seq"], **spec["config"]},
            "rank": RANK, "targets": TARGETS[spec["arch"]], "variants": variants}


def long_context(settings: GpuSettings, device: torch.device, log: Callable[[str], None],
                 save: Callable[[dict], None] = lambda partial: None) -> dict:
    """Full HyLoRADA on the Llama-3-8B shape, batch 1, gradient checkpointing, chunked loss: one step per length;
    `save` gets the result so far after each length (a run killed at its time limit keeps the lengths it finished)."""
    from lmlab.engine.train import activation_checkpointing

    lengths = sorted(settings.lengths)
    spec = {**LONG_MODEL, "config": {**LONG_MODEL["config"], "max_position_embeddings": max(lengths)}}
    release()
    base = build_base(spec["arch"], spec["config"], settings.seed, device)
    model = make_variant(base, spec["arch"], "hylorada", max(lengths))
    runs = []
    done = {"model": {"name": spec["name"], **spec["config"]}, "batch": 1, "variant": "hylorada",
            "gradient_checkpointing": True, "loss_chunk": "auto", "runs": runs}
    with activation_checkpointing(model, True):
        for length in lengths:
            step = make_step(model, token_batch({**spec, "batch": 1, "seq": length}, settings.seed, device), True)
            release()
            torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            try:
                loss = step()
                torch.cuda.synchronize(device)
                run = {"length": length, "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                       "step_s": time.perf_counter() - start, "loss": loss}
            except RuntimeError as exc:  # CUDA's allocator, or cuBLAS failing to allocate its workspace
                if not is_out_of_memory(exc):
                    raise
                run = {"length": length, "peak_gib": None, "oom": True}
            model.zero_grad(set_to_none=True)
            del step
            runs.append(run)
            save(done)
            log(f"  {spec['name']} hylorada at {length} tokens: "
                + ("out of memory" if run.get("oom") else f"peak {run['peak_gib']:.1f} GiB, {run['step_s']:.1f} s"))
            if run.get("oom"):
                break  # longer sequences need more
    del model, base
    release()
    return done


def rows_of(results: dict) -> list[Row]:
    """The comparison rows of every benchmarked model (times interleaved; memory single measurements)."""
    rows = []
    for name, bench in results["models"].items():
        if "error" in bench:  # the model's benchmark failed: nothing to compare
            continue
        variants = bench["variants"]
        times = {v: variants[v]["times_s"] for v in variants}
        for ours, reference, metric, target, where in COMPARISONS:
            target = target if where is None or name in where else None
            if metric == "s/step":
                rows.append(compare(f"gpu {name}", ours, reference, times, target))
                continue
            a, b = variants[ours].get("peak_gib"), variants[reference].get("peak_gib")
            if a is None or b is None:
                continue
            ratio = a / b
            rows.append(Row(f"gpu {name}", ours, reference, metric, a, b, ratio,
                            None if target is None else f"<= {target:g}", None if target is None else ratio <= target))
    return rows


def machine() -> dict:
    import peft
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "peft": peft.__version__}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, gpus=torch.cuda.device_count())
    return info


def run(settings: GpuSettings, out: Path, log: Callable[[str], None] = print,
        device: torch.device | None = None) -> Path:
    """The GPU benchmarks; writes `<date>-gpu.json` and `.md` into `out` (never over an earlier run). `device`: the
    first GPU (tests pass the CPU, with CUDA's memory counters stood in for)."""
    if device is None:
        require_cuda()
        device = torch.device("cuda", 0)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    if device.type == "cuda":  # what GPU training runs with (bf16 autocast does the rest); put back at the end
        torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return _run(settings, out, log, device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _run(settings: GpuSettings, out: Path, log: Callable[[str], None], device: torch.device) -> Path:
    started = datetime.now()
    results: dict = {"date": started.date().isoformat(), "started": started.isoformat(timespec="seconds"),
                     "machine": machine(), "settings": asdict(settings), "models": {}, "rows": []}
    partial = out / f"{started:%Y-%m-%dT%H%M%S}-gpu-partial.json"
    out.mkdir(parents=True, exist_ok=True)
    def save() -> None:  # survives a run killed at its time limit
        partial.write_text(json.dumps(results, indent=1) + "\n")

    for name in settings.models:
        log(f"bench gpu {name} ...")
        begun = time.perf_counter()
        try:
            results["models"][name] = bench_model(name, settings, device, log)
        except (RuntimeError, ImportError, ValueError) as exc:  # one model's failure (memory, a library) is recorded;
            results["models"][name] = {"error": f"{type(exc).__name__}: {exc}"}  # the others still run
            log(f"  {name}: FAILED - {type(exc).__name__}: {str(exc)[:300]}")
            release()
        results["models"][name]["wall_s"] = time.perf_counter() - begun
        rows = rows_of(results)
        results["rows"] = [asdict(r) for r in rows]
        save()
        for r in rows:
            if r.benchmark == f"gpu {name}":
                log(f"  {name}: {format_row(r)}")
    if settings.lengths:
        log(f"bench gpu long context {settings.lengths} ...")
        begun = time.perf_counter()
        def save_long(done: dict) -> None:
            results["long_context"] = done
            save()

        results["long_context"] = long_context(settings, device, log, save_long)
        results["long_context"]["wall_s"] = time.perf_counter() - begun
    results["finished"] = datetime.now().isoformat(timespec="seconds")
    path = write_results(out, started, "-gpu", results, markdown(results))
    partial.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------------------------------------------
# The table


def _gib(value: float | None) -> str:
    return "OOM" if value is None else f"{value:.1f} GiB"


def markdown(results: dict) -> str:
    """The results as markdown: the comparisons, per-variant times and memory, the long-context probe."""
    m = results["machine"]
    gpu = f"{m.get('gpus', 1)} x {m.get('gpu', 'unknown GPU')} ({m.get('gpu_memory_gib', 0):.0f} GiB)"
    lines = [f"GPU benchmarks of {results['started']} on {gpu}; torch {m['torch']} (CUDA {m.get('cuda')}), "
             f"transformers {m['transformers']}, peft {m['peft']}. bf16 base weights, bf16 autocast, rank {RANK} on "
             "every linear layer of the blocks, random init. Ratio: median over interleaved rounds of ours / reference "
             "(s/step); memory: peak CUDA memory of each variant alone on the GPU. 95% CI: distribution-free interval "
             "of the median ratio.", "",
             "| benchmark | ours | reference | ours | reference | ratio | 95% CI | target | met |",
             "|---|---|---|---:|---:|---:|---:|---:|:-:|"]
    lines += [table_line(row, lambda v, r: f"{v:.1f} GiB" if r.metric == "GiB" else f"{v * 1000:.1f} ms")
              for row in results["rows"]]
    lines += ["", "| model | batch | variant | trainable params | step (ms) | peak memory |",
              "|---|---|---|---:|---:|---:|"]
    for name, bench in results["models"].items():
        if "error" in bench:
            lines.append(f"| {name} | | FAILED: {bench['error'][:200].replace('|', '/')} | | | |")
            continue
        shape = f"{bench['model']['batch']} x {bench['model']['seq']}"
        for variant, v in bench["variants"].items():
            lines.append(f"| {name} | {shape} | {variant} | {v['trainable_params']:,} | {v['median_s'] * 1000:.1f} "
                         f"| {_gib(v.get('peak_gib'))} |")
    long = results.get("long_context")
    if long:
        lines += ["", f"Long context: {long['model']['name']} shape (vocab {long['model']['vocab_size']:,}), bf16, "
                      f"full HyLoRADA, batch 1, gradient checkpointing, chunked loss; one step per length.", "",
                  "| tokens | peak memory | step (s) |", "|---:|---:|---:|"]
        for run in long["runs"]:
            step = "" if run.get("oom") else f"{run['step_s']:.1f}"
            lines.append(f"| {run['length']:,} | {_gib(run.get('peak_gib'))} | {step} |")
    return "\n".join(lines) + "\n"


def main(command: str, argument: str) -> None:
    """`run OPTIONS`: the GPU benchmarks (progress on stderr, the results path on stdout)."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # peft on transformers v5: renamed APIs
    if command != "run":
        raise SystemExit(f"unknown command {command!r}: use run")
    opts = json.loads(argument)
    settings = GpuSettings(quick=opts["quick"], models=opts["models"], lengths=opts["lengths"])
    print(run(settings, Path(opts["out"]), log=lambda line: print(line, file=sys.stderr)))


if __name__ == "__main__":
    main(*sys.argv[1:3])
