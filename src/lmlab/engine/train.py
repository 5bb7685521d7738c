"""The one training loop (docs/protocol.md section 3). Every study trains through `train()`.

Losses are exact per-unit means over the *global* batch: a loss function returns the SUM of its loss
over a micro-batch and the number of units (tokens) in it; the loop backpropagates the sums, then
divides the accumulated gradients by the number of units over all micro-batches and processes. So
gradient accumulation and DDP give the same update as one big batch, whatever the padding, and a
partial last batch is used, not dropped. `batch_size` is global: each micro-batch of `batch_size`
examples is split evenly across the processes, so 1 and N processes take the same examples per
optimizer step (`batch_size * grad_accum`) and give the same losses.

While `train()` runs, the Hugging Face models being trained use lmlab's attention (`lmlab.kernels`: the compiled
CPU kernel for float32 causal self-attention without padding, SDPA otherwise - the same results, faster on CPU);
each is back on its own attention implementation when `train()` returns. `LMLAB_CPU_KERNELS=0` turns it off.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import psutil
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn
from tqdm.auto import tqdm

from lmlab.config import Section
from lmlab.engine import distributed as D
from lmlab.engine.nll import IGNORE_INDEX, token_nll
from lmlab.engine.optim import GroupRule, lr_factor, param_groups
from lmlab.errors import ConfigError
from lmlab.kernels import kernel_attention


class TrainConfig(Section):
    """How a model is trained: the optimizer, schedule, batching and stopping rules."""

    epochs: float = Field(1.0, gt=0, description="passes over the training data (fractions allowed)")
    max_steps: int | None = Field(None, ge=1, description="cap on optimizer steps")
    batch_size: int = Field(8, ge=1, description="examples per micro-batch over all processes (split evenly "
                            "across them: a multiple of the number of processes)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int | None = Field(None, ge=0, description="None: warmup_ratio of the total steps")
    warmup_ratio: float = Field(0.05, ge=0, le=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    eval_every: int | None = Field(None, ge=1, description="optimizer steps between evaluations (None: per epoch)")
    early_stopping_patience: int | None = Field(None, ge=1, description="evaluations without improvement")
    log_every: int = Field(10, ge=1)
    compile: bool = False
    ddp_find_unused_parameters: bool = False


@dataclass
class LossOut:
    """A micro-batch's loss as a SUM over its units, the number of units, and summed terms to log."""

    total: torch.Tensor
    weight: float | torch.Tensor
    logs: dict[str, torch.Tensor | float] = field(default_factory=dict)


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN/inf loss (or, in fp32/bf16, gradient norm); the study records the cell as
    failed with the optimizer step (1-based: the first step is 1) and the value."""

    def __init__(self, step: int, value: float, what: str = "loss"):
        super().__init__(f"non-finite {what} {value} at optimizer step {step}")
        self.step = step
        self.value = value


@dataclass
class TrainResult:
    steps: int
    examples: int
    tokens: int
    train_time_s: float
    final_loss: float | None
    peak_mem_mb: float
    history: list[dict]
    best: dict | None = None
    stopped_early: bool = False


# ---------------------------------------------------------------------------------------------------
# Losses and batching


def model_logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def causal_lm_loss(model: nn.Module, batch: dict) -> LossOut:
    """Summed next-token NLL over positions whose label is not -100 (padding is never in the loss).

    With `loss_weights` in the batch (one per token, like `labels`) it is the weighted sum and the weight is the
    summed weights: a weighted token mean over the global batch.
    """
    labels = batch["labels"]
    weights = batch.get("loss_weights")
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "loss_weights")}
    logits = model_logits(model(**inputs))
    # position t predicts label t+1: shift the labels (the last position predicts nothing) rather than copy
    # the logits without their last position
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    if weights is not None:
        shift_weights = F.pad(weights[:, 1:], (0, 1)) * (shift_labels != IGNORE_INDEX)
        rows = F.cross_entropy(logits.flatten(0, 1).float(), shift_labels.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="none")
        nll = (rows * shift_weights.flatten()).sum()
        return LossOut(nll, shift_weights.sum(), {"nll": nll.detach()})
    nll = token_nll(logits.flatten(0, 1), shift_labels.flatten())
    count = (shift_labels != IGNORE_INDEX).sum()
    return LossOut(nll, count, {"nll": nll.detach()})


def collate_lm(examples: Sequence[dict], pad_token_id: int = 0) -> dict:
    """Right-pad `input_ids` (and `labels`, default = input_ids) to the longest example; labels -100 on padding.

    Examples with `loss_weights` (one per token) get them padded with 0 (see `causal_lm_loss`). Adds
    `attention_mask` only when some padding exists, so fixed-length models (MU) never see it.
    """
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    weighted = "loss_weights" in examples[0]
    weights = torch.zeros((len(examples), width)) if weighted else None
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.as_tensor(e["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(e.get("labels", e["input_ids"]), dtype=torch.long)
        mask[i, :n] = 1
        if weighted:
            weights[i, :n] = torch.as_tensor(e["loss_weights"], dtype=torch.float32)
    batch = {"input_ids": ids, "labels": labels}
    if weighted:
        batch["loss_weights"] = weights
    if not bool(mask.all()):
        batch["attention_mask"] = mask
    return batch


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _count_tokens(batch) -> int:
    """Input tokens of a batch: `num_tokens` when the collate function provides it, else from the mask/ids."""
    if isinstance(batch, dict):
        if "num_tokens" in batch:
            return int(batch["num_tokens"])
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        if "input_ids" in batch:
            return batch["input_ids"].numel()
    return 0


# ---------------------------------------------------------------------------------------------------
# Memory


class PeakMemory:
    """Peak memory while training: CUDA max allocated on GPU, sampled process RSS on CPU (MB)."""

    def __init__(self, device: torch.device, interval_s: float = 0.05):
        self.device = device
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            proc = psutil.Process()
            self.peak = proc.memory_info().rss

            def sample():
                while not self._stop.wait(self.interval_s):
                    self.peak = max(self.peak, proc.memory_info().rss)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak = max(self.peak, psutil.Process().memory_info().rss)
        return False

    @property
    def mb(self) -> float:
        return self.peak / 2**20


# ---------------------------------------------------------------------------------------------------
# The loop


def _autocast(device: torch.device, precision: str):
    if device.type != "cuda" or precision == "fp32":
        if device.type == "cpu" and precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()
    if precision == "fp16":
        return torch.autocast("cuda", dtype=torch.float16)
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cuda", dtype=torch.float16)


def build_optimizer(params, lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `params` (tensors or groups), fp32 master weights, as every run and benchmark uses it.

    The fused kernel updates all parameters in one pass instead of a dozen small ops per tensor: on CPU it
    is ~4-8x faster than the per-tensor loop (many small adapter tensors), on CUDA it is the fused launch.
    """
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=device.type in ("cpu", "cuda"))


def steps_per_epoch(num_examples: int, cfg: TrainConfig) -> int:
    """Optimizer steps per epoch: a step takes batch_size * grad_accum examples, however many processes."""
    return max(1, math.ceil(num_examples / (cfg.batch_size * cfg.grad_accum)))


def total_steps(num_examples: int, cfg: TrainConfig) -> int:
    steps = max(1, math.ceil(cfg.epochs * steps_per_epoch(num_examples, cfg)))
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def check_batch_split(config, world: int, prefix: str = "") -> None:
    """Every TrainConfig inside a (study) config splits its global batch evenly across `world` processes; else the
    ConfigError of the first that does not, named by its dotted key (e.g. `base.train.batch_size`)."""
    if isinstance(config, TrainConfig):
        try:
            D.split_batch(config.batch_size, world)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("train.batch_size", f"{prefix}batch_size", 1)) from None
        return
    for name in type(config).model_fields if isinstance(config, BaseModel) else ():
        value = getattr(config, name)
        # a tiny base's pretraining (`base` beside `model`, `source` beside `source_model`) runs for 'builtin' only
        model = getattr(config, f"{name}_model", getattr(config, "model", None) if name == "base" else None)
        if isinstance(value, BaseModel) and model in (None, "builtin"):
            check_batch_split(value, world, f"{prefix}{name}.")


def _step_plan(n: int, cfg: TrainConfig, seed: int, world: int, steps: int):
    """Yield, per optimizer step, this rank's micro-batches as lists of (example index, is_ghost).

    The data order is a seeded permutation per epoch, identical on every rank. Each global batch
    (batch_size * grad_accum examples) is dealt round-robin to ranks, batch_size / world per micro-batch;
    a rank short of examples gets ghost copies (loss weight 0) so every rank runs the same number of
    forward/backward passes, which DDP requires.
    """
    per_epoch = steps_per_epoch(n, cfg)
    global_batch = cfg.batch_size * cfg.grad_accum
    local_batch = D.split_batch(cfg.batch_size, world)
    me = D.rank()
    perm: list[int] = []
    for step in range(steps):
        epoch, k = divmod(step, per_epoch)
        if k == 0:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perm = torch.randperm(n, generator=gen).tolist()
        chunk = perm[k * global_batch:(k + 1) * global_batch]
        mine = chunk[me::world]
        micro_count = math.ceil(math.ceil(len(chunk) / world) / local_batch)
        micro = []
        for m in range(micro_count):
            part = [(i, False) for i in mine[m * local_batch:(m + 1) * local_batch]]
            if not part:
                part = [(chunk[0], True)]
            micro.append(part)
        yield epoch, micro


def _with_kernel_attention(fn: Callable) -> Callable:
    """Run `fn(model, ...)` with the transformers models in `model` on lmlab's attention (module doc)."""

    @functools.wraps(fn)
    def wrapper(model: nn.Module, *args, **kwargs):
        with kernel_attention(model):
            return fn(model, *args, **kwargs)

    return wrapper


@_with_kernel_attention
def train(
    model: nn.Module,
    train_data: Sequence,
    cfg: TrainConfig,
    *,
    seed: int,
    loss_fn: Callable[[nn.Module, object], LossOut] = causal_lm_loss,
    collate: Callable[[list], object] = collate_lm,
    rules: Sequence[GroupRule] = (),
    evaluate: Callable[[nn.Module], dict] | None = None,
    select: str = "val_loss",
    higher_is_better: bool = False,
    restore_best: bool | None = None,
    aux_loss: Callable[[nn.Module], torch.Tensor] | None = None,
    before_step: Callable[[int, nn.Module], None] | None = None,
    on_step: Callable[[int, nn.Module], None] | None = None,
    metrics_path: str | Path | None = None,
    progress: bool = True,
    desc: str = "train",
) -> TrainResult:
    """Train `model` (its trainable parameters) on `train_data` and return what happened.

    - `loss_fn(model, batch) -> LossOut` with sums (see module docstring); `collate(examples) -> batch`.
    - `rules`: optimizer groups with their own learning rate / weight decay (regex on parameter names).
    - `evaluate(model) -> dict` runs every `cfg.eval_every` optimizer steps (else once per epoch) and at
      the end; `select` names the metric that early stopping and best-weight selection use.
    - `restore_best` (default: when early stopping is on): copy the best evaluation's trainable weights
      (a copy, not a reference to the live tensors) and load them back at the end.
    - `aux_loss(model)`: a per-step penalty added with unit weight (e.g. boundary diversity).
    - `before_step(step, model)`: called with the final gradients, before clipping and the optimizer
      step (e.g. to drop the gradients of parameters frozen for the first steps of a curriculum).
    - A non-finite loss raises `NonFiniteLoss(step, value)`; so does a non-finite gradient norm without an
      fp16 loss scaler (clipping would turn it into zero gradients: a step that silently trains nothing).
      With the scaler, such steps are skipped and the scale lowered, as mixed precision intends.
    """
    D.seed_everything(seed)
    device = D.device()
    world = D.world_size()
    D.split_batch(cfg.batch_size, world)  # a global batch the processes cannot share evenly is refused first
    model.to(device)
    checkpointing = cfg.gradient_checkpointing and hasattr(model, "activation_checkpointing_enable")
    if checkpointing:
        # Non-reentrant checkpointing works when the inputs do not require grad (frozen base + adapters).
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    groups = param_groups(model, cfg.lr, cfg.weight_decay, rules)
    for g in groups:
        g["initial_lr"] = g["lr"]
    optimizer = build_optimizer(groups, cfg.lr, device)
    use_scaler = device.type == "cuda" and cfg.precision == "fp16"
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    wrapped: nn.Module = model
    if world > 1:
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.ddp_find_unused_parameters,
        )
    if cfg.compile:
        wrapped = torch.compile(wrapped)
    n = len(train_data)
    if n == 0:
        raise ValueError("no training examples")
    steps = total_steps(n, cfg)
    per_epoch = steps_per_epoch(n, cfg)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_ratio * steps))
    eval_every = cfg.eval_every or per_epoch
    restore = cfg.early_stopping_patience is not None if restore_best is None else restore_best

    metrics_file = None
    if metrics_path is not None and D.is_main():
        Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
        metrics_file = open(metrics_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in finally

    history: list[dict] = []
    best: dict | None = None
    best_state: dict[str, torch.Tensor] | None = None
    evals_since_best = 0
    stopped_early = False
    tokens_seen = examples_seen = 0
    final_loss = None
    train_time = 0.0
    done = 0
    bar = tqdm(total=steps, desc=desc, disable=not (progress and D.is_main()), leave=False, dynamic_ncols=True)

    def log(record: dict) -> None:
        history.append(record)
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    def run_eval(step: int) -> bool:
        """Evaluate, track the best weights; True when early stopping says stop."""
        nonlocal best, best_state, evals_since_best
        model.eval()
        with torch.no_grad():
            result = evaluate(model)
        model.train()
        score = result.get(select)
        log({"step": step, "kind": "eval", **result})
        if score is None or not math.isfinite(score):
            return False
        better = best is None or (score > best[select] if higher_is_better else score < best[select])
        if better:
            best = {"step": step, **result}
            evals_since_best = 0
            if restore:
                best_state = {name: p.detach().clone() for name, p in trainable}
        else:
            evals_since_best += 1
        return cfg.early_stopping_patience is not None and evals_since_best >= cfg.early_stopping_patience

    model.train()
    with PeakMemory(device) as mem:
        try:
            t_start = time.perf_counter()
            window_tokens, window_start = 0, time.perf_counter()
            for step, (epoch, micro) in enumerate(_step_plan(n, cfg, seed, world, steps)):
                factor = lr_factor(step, warmup, steps, cfg.schedule, cfg.min_lr_ratio)
                for g in optimizer.param_groups:
                    g["lr"] = g["initial_lr"] * factor
                local_total = torch.zeros((), device=device, dtype=torch.float64)
                local_weight = torch.zeros((), device=device, dtype=torch.float64)
                local_tokens = torch.zeros((), device=device, dtype=torch.float64)
                local_examples = torch.zeros((), device=device, dtype=torch.float64)
                local_logs: dict[str, torch.Tensor] = {}
                for m, part in enumerate(micro):
                    batch = _to_device(collate([train_data[i] for i, _ in part]), device)
                    ghost = part[0][1]
                    sync = m == len(micro) - 1
                    ctx = wrapped.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
                    with ctx:
                        with _autocast(device, cfg.precision):
                            out = loss_fn(wrapped, batch)
                        total = out.total.float() * (0.0 if ghost else 1.0)
                        if scaler is not None:
                            scaler.scale(total).backward()
                        else:
                            total.backward()
                    # Ghosts add zeros (not nothing), so every rank reduces the same set of log terms.
                    real = 0.0 if ghost else 1.0
                    local_total += total.detach().double()
                    local_weight += real * torch.as_tensor(out.weight, dtype=torch.float64, device=device)
                    for k, v in out.logs.items():
                        term = torch.as_tensor(v, dtype=torch.float64, device=device).detach()
                        local_logs[k] = local_logs.get(k, 0) + real * term
                    if not ghost:
                        local_tokens += _count_tokens(batch)
                        local_examples += len(part)
                stats = torch.stack([local_total, local_weight, local_tokens, local_examples, *local_logs.values()])
                stats = D.all_reduce_sum(stats)
                global_total, global_weight = float(stats[0]), float(stats[1])
                tokens_seen += int(stats[2])
                examples_seen += int(stats[3])
                window_tokens += int(stats[2])
                loss_value = global_total / max(global_weight, 1.0)
                if not math.isfinite(loss_value):
                    raise NonFiniteLoss(step + 1, loss_value)
                if scaler is not None:
                    scaler.unscale_(optimizer)
                # DDP averaged the summed gradients over ranks; turn them into per-unit means.
                grad_scale = world / max(global_weight, 1.0)
                for _, p in trainable:
                    if p.grad is not None:
                        p.grad.mul_(grad_scale)
                if aux_loss is not None:
                    aux = aux_loss(model)
                    if aux.requires_grad:
                        aux.backward()
                if before_step is not None:
                    before_step(step, model)
                grad_norm = None
                if cfg.max_grad_norm is not None:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_([p for _, p in trainable], cfg.max_grad_norm))
                    if scaler is None and not math.isfinite(grad_norm):
                        raise NonFiniteLoss(step + 1, grad_norm, "gradient norm")
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if on_step is not None:
                    on_step(step, model)
                final_loss = loss_value
                done = step + 1
                if done % cfg.log_every == 0 or done == steps:
                    now = time.perf_counter()
                    record = {"step": done, "kind": "train", "epoch": epoch, "loss": loss_value,
                              "lr": cfg.lr * factor,
                              "tokens_per_s": window_tokens / max(now - window_start, 1e-9)}
                    if grad_norm is not None:
                        record["grad_norm"] = grad_norm
                    for k, v in zip(local_logs, stats[4:], strict=True):
                        record[k] = float(v) / max(global_weight, 1.0)
                    log(record)
                    window_tokens, window_start = 0, now
                bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
                bar.update(1)
                if evaluate is not None and (done % eval_every == 0 or done == steps):
                    t_eval = time.perf_counter()
                    stop = run_eval(done)
                    t_start += time.perf_counter() - t_eval  # evaluation time is not training time
                    if stop and done < steps:
                        stopped_early = True
                        break
            train_time = time.perf_counter() - t_start
        finally:
            bar.close()
            if metrics_file is not None:
                metrics_file.close()
    if restore and best_state is not None:
        with torch.no_grad():
            for name, p in trainable:
                p.copy_(best_state[name])
    if checkpointing:
        model.activation_checkpointing_disable()
    model.eval()
    return TrainResult(
        steps=done, examples=examples_seen,
        tokens=tokens_seen, train_time_s=train_time, final_loss=final_loss, peak_mem_mb=mem.mb,
        history=history, best=best, stopped_early=stopped_early,
    )
