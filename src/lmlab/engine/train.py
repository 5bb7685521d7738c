"""The one training loop (docs/protocol.md section 3). Every study trains through `train()`.

Losses are exact per-unit means over the *global* batch: a loss function returns the SUM of its loss
over a micro-batch and the number of units (tokens) in it; the loop backpropagates the sums, then
divides the accumulated gradients by the number of units over all micro-batches and processes. So
gradient accumulation and DDP give the same update as one big batch, whatever the padding, and a
partial last batch is used, not dropped. `batch_size` is global: each micro-batch of `batch_size`
examples is split evenly across the processes, so 1 and N processes take the same examples per
optimizer step (`batch_size * grad_accum`) and give the same losses.

A method adds to the loop through one protocol, `lmlab.engine.hooks.Hooks` (loss, optimizer groups, an auxiliary
loss, after-backward, after-step, evaluate), whose methods receive the `TrainState` (lmlab.engine.state).

With a `checkpoint_dir`, the state is checkpointed every `checkpoint_every` optimizer steps, every
`checkpoint_minutes` of wall time, at the end, and when SIGTERM/SIGINT stops the loop (lmlab.engine.interrupt);
`train()` called again with the same arguments continues from the newest checkpoint and computes the same steps,
metrics and weights as a run that was never stopped (see docs/architecture.md, "Interruption and resume").

`train.attention` chooses the attention of the Hugging Face models being trained: `auto` is lmlab's on CPU (the
compiled kernel for float32 causal self-attention without padding, SDPA otherwise - the same results, faster) and
the model's own on GPU; `sdpa` keeps the model's own; `lmlab` switches to lmlab's everywhere. Each model is back on
its own attention implementation when `train()` returns. `LMLAB_CPU_KERNELS=0` turns the kernel off.

Memory (README, "GPUs and torchrun"): `train.loss_chunk` computes the LM head and the loss chunk by
chunk of tokens, never the full [tokens, vocab] float32 logits (lmlab.engine.lmhead; `auto`: where they would pass
256 MiB); `train.gradient_checkpointing` recomputes each transformer block in the backward pass (Hugging Face models
and MU / dense models; a model that cannot is a ConfigError, never a silent no-op); `train.kernels=liger` runs
Llama-family models on liger-kernel's fused Triton kernels (CUDA, `pip install 'lmlab[gpu]'`). Frozen weights keep
the dtype they were loaded in: the loop moves the model to its device, never to another dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import psutil
import torch
from pydantic import BaseModel, Field
from torch import nn
from tqdm.auto import tqdm

from lmlab.config import Section
from lmlab.engine import distributed as D
from lmlab.engine import state as checkpoints
from lmlab.engine.hooks import Display, Hooks
from lmlab.engine.interrupt import STOP, TrainingInterrupted
from lmlab.engine.losses import LossOut, causal_lm_loss, collate_lm, loss_settings, model_logits  # noqa: F401
from lmlab.engine.optim import lr_factor, param_groups
from lmlab.engine.state import TrainState
from lmlab.errors import CheckpointError, ConfigError
from lmlab.fileio import atomic_write_text
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
    loss_chunk: Annotated[int, Field(ge=0)] | Literal["auto"] | None = Field(
        "auto", description="tokens per chunk of the LM head + cross-entropy, never the full [tokens, vocab] "
        "logits (auto: chunks where those float32 logits would pass 256 MiB; 0 or null: the full logits; with "
        "compile: the full logits)")
    kernels: Literal["torch", "liger"] = Field(
        "torch", description="liger: liger-kernel's fused RMSNorm / RoPE / SwiGLU and linear cross-entropy for "
        "Llama-family models (CUDA; pip install 'lmlab[gpu]')")
    ddp_find_unused_parameters: bool = False
    attention: Literal["auto", "sdpa", "lmlab"] = Field(
        "auto", description="attention of Hugging Face models while training: auto (lmlab's on CPU, the model's "
        "own on GPU), sdpa (the model's own), lmlab (lmlab's everywhere)")
    checkpoint_every: int | None = Field(200, ge=1, description="optimizer steps between training checkpoints of "
                                         "a cell (None: by time only)")
    checkpoint_minutes: float | None = Field(10.0, gt=0, description="minutes of wall time between training "
                                             "checkpoints (None: by steps only)")

    def describe(self, lr: str | None = None, examples: int | None = None) -> str:
        """The schedule in words, for a report's setting: '2 epochs, batch 16, learning rate 0.003 (cosine, 5%
        warmup), weight decay 0, gradient clipping at 1'; `lr` words the learning rate where it is not `self.lr`
        (e.g. chosen per model by a search); with `examples` (training examples per epoch) the optimizer steps they
        make: '1 epoch (50 optimizer steps)', the budget a reader weighs a null result against."""
        steps = f", at most {self.max_steps} steps" if self.max_steps else ""
        if examples:
            count = total_steps(examples, self)
            steps = f" ({count:,} optimizer step{'' if count == 1 else 's'})" + steps
        batch = f"batch {self.batch_size}" + (f" x {self.grad_accum} accumulated" if self.grad_accum > 1 else "")
        warmup = (f"{self.warmup_steps} warmup steps" if self.warmup_steps is not None
                  else f"{self.warmup_ratio:.0%} warmup")
        clip = f", gradient clipping at {self.max_grad_norm:g}" if self.max_grad_norm else ""
        stop = (f", early stopping after {self.early_stopping_patience} evaluations without improvement"
                if self.early_stopping_patience else "")
        rate = lr or format(self.lr, "g")
        return (f"{self.epochs:g} epoch{'' if self.epochs == 1 else 's'}{steps}, {batch}, learning rate {rate} "
                f"({self.schedule}, {warmup}), weight decay {self.weight_decay:g}{clip}{stop}")

    def fingerprint(self) -> dict:
        """What a checkpoint's training must share with this one to be resumed by it (not how often it is
        checkpointed, evaluated or logged, or how attention is computed)."""
        skip = {"checkpoint_every", "checkpoint_minutes", "log_every", "attention", "compile", "loss_chunk", "kernels"}
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in skip}


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
    resumed_from: int | None = None  # the optimizer step of the checkpoint this run continued from


# ---------------------------------------------------------------------------------------------------
# Losses and batching


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


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The dtype `train.precision` autocasts to on `device` (None: no autocast). `auto` on CUDA is bf16 where the
    GPU supports it, else fp16 - which then needs a loss scaler, as `fp16` does."""
    if device.type != "cuda" or precision == "fp32":
        return torch.bfloat16 if device.type == "cpu" and precision == "bf16" else None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def _autocast(device: torch.device, precision: str):
    dtype = autocast_dtype(device, precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


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


def _step_plan(n: int, cfg: TrainConfig, seed: int, world: int, steps: int, start: int = 0):
    """Yield, per optimizer step from `start`, this rank's micro-batches as lists of (example index, is_ghost).

    The data order is a seeded permutation per epoch, identical on every rank, so the step alone fixes the position
    in it. Each global batch (batch_size * grad_accum examples) is dealt round-robin to ranks, batch_size / world
    per micro-batch; a rank short of examples gets ghost copies (loss weight 0) so every rank runs the same number
    of forward/backward passes, which DDP requires.
    """
    per_epoch = steps_per_epoch(n, cfg)
    global_batch = cfg.batch_size * cfg.grad_accum
    local_batch = D.split_batch(cfg.batch_size, world)
    me = D.rank()
    perm: list[int] = []
    for step in range(start, steps):
        epoch, k = divmod(step, per_epoch)
        if k == 0 or step == start:
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


@contextlib.contextmanager
def attention(model: nn.Module, choice: str, device: torch.device) -> Iterator[None]:
    """`train.attention` (module doc) for the duration of the block."""
    if choice == "lmlab" or (choice == "auto" and device.type == "cpu"):
        with kernel_attention(model):
            yield
    else:
        yield


def _hf_model(model: nn.Module) -> nn.Module | None:
    """The transformers model inside `model` (itself, or the base of a peft model), else None."""
    from transformers import PreTrainedModel

    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return base if isinstance(base, PreTrainedModel) else None


@contextlib.contextmanager
def activation_checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Gradient checkpointing for the block: every transformer block's activations are recomputed in the backward
    pass instead of kept. Non-reentrant (`torch.utils.checkpoint(use_reentrant=False)`): it recomputes also when the
    block's inputs do not require grad, as with a frozen base and adapters. Models of lmlab (MU, dense) through their
    `set_gradient_checkpointing`, transformers models through `activation_checkpointing_enable` or, where
    transformers has no such method yet (5.17 has not: lmlab used to skip checkpointing there, silently),
    `gradient_checkpointing_enable`; any other model is a ConfigError."""
    if not enabled:
        yield
        return
    hf = _hf_model(model)
    own = getattr(model, "set_gradient_checkpointing", None) if hf is None else None
    if not callable(own) and not getattr(hf, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.gradient_checkpointing: {type(model).__name__} cannot checkpoint its blocks (neither "
                          "a transformers model that supports it nor an lmlab MU / dense model); set it to false")
    had_input_hook = hasattr(hf, "_require_grads_hook")
    if callable(own):
        own(True)
    elif hasattr(hf, "activation_checkpointing_enable"):
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        if callable(own):
            own(False)
        else:
            (hf.activation_checkpointing_disable if hasattr(hf, "activation_checkpointing_disable")
             else hf.gradient_checkpointing_disable)()
            if not had_input_hook and hasattr(hf, "_require_grads_hook"):
                hf.disable_input_require_grads()  # the input hook the enabling added


def check_kernels(model: nn.Module, choice: str, device: torch.device) -> None:
    """`train.kernels=liger` needs liger-kernel, a CUDA device and a transformers model: else one ConfigError."""
    if choice != "liger":
        return
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError("train.kernels=liger needs liger-kernel, which is not installed: pip install 'lmlab[gpu]' "
                          "(NVIDIA GPUs), or train.kernels=torch")
    if device.type != "cuda":
        raise ConfigError(f"train.kernels=liger runs Triton kernels on CUDA GPUs; this run is on {device.type}: use "
                          "train.kernels=torch")
    hf = _hf_model(model)
    if hf is None:
        raise ConfigError(f"train.kernels=liger patches Hugging Face Llama-family models, not {type(model).__name__}; "
                          "use train.kernels=torch")
    from liger_kernel.transformers import monkey_patch

    supported = getattr(monkey_patch, "MODEL_TYPE_TO_APPLY_LIGER_FN", None)
    model_type = getattr(hf.config, "model_type", None)
    if supported is not None and model_type not in supported:
        raise ConfigError(f"train.kernels=liger has no kernels for model type '{model_type}' (liger-kernel supports "
                          f"{', '.join(sorted(supported))}); use train.kernels=torch")


@contextlib.contextmanager
def kernels(model: nn.Module, choice: str, device: torch.device) -> Iterator[None]:
    """`train.kernels` (after `check_kernels`) for the duration of the block: liger's fused RMSNorm, RoPE and SwiGLU
    on the model (for the architectures liger supports; the loss's fused linear cross-entropy comes with
    `loss_settings`). liger patches the model's modules and also module-level names of the transformers modeling
    file (RoPE is a function there): those are put back afterwards, so models built or trained later in the process
    with `kernels=torch` run the plain code. On the model itself liger binds a `forward` (and a few attributes) to
    each norm and MLP instance: those are removed afterwards too, so the trained model runs the plain code again (on
    any device: Triton kernels run on CUDA only)."""
    check_kernels(model, choice, device)
    if choice != "liger":
        yield
        return
    import sys

    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    hf = _hf_model(model) or model
    module = sys.modules[type(hf).__module__]
    saved = dict(vars(module))
    instance_keys = {m: set(vars(m)) for m in hf.modules()}  # each module's own attributes before liger's patches
    try:
        _apply_liger_kernel_to_instance(model=hf, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=False)
        yield
    finally:
        for name in [n for n in vars(module) if n not in saved]:
            delattr(module, name)
        for name, value in saved.items():
            if vars(module).get(name) is not value:
                setattr(module, name, value)
        for m, keys in instance_keys.items():  # the instance patches: a bound forward, extra_repr, liger's settings
            for name in [n for n in vars(m) if n not in keys]:
                delattr(m, name)


class Checkpointer:
    """When and where the train state is checkpointed, and resuming from the newest checkpoint."""

    def __init__(self, directory: Path, cfg: TrainConfig, fingerprint: dict, display: Display):
        self.directory, self.cfg, self.fingerprint, self.display = Path(directory), cfg, fingerprint, display
        self.last_time = time.monotonic()

    def resume(self, state: TrainState, hooks: Hooks) -> bool:
        found = checkpoints.latest(self.directory, self.fingerprint, self.display.line)
        if found is None:
            return False
        try:
            found.restore(state)  # checks everything before it changes anything
        except (CheckpointError, KeyError, TypeError, ValueError) as exc:
            what = exc if isinstance(exc, CheckpointError) else f"{found.path / 'state.json'} is incomplete ({exc!r})"
            checkpoints.discard(self.directory, f"{what}; this training starts from the beginning",
                                self.display.line)
            return False
        hooks.load_state_dict(found.values.get("hooks") or {})
        self.display.line(f"{self.display.desc}: resuming from the checkpoint of step {state.step} "
                          f"({found.path})")
        return True

    def due(self, state: TrainState) -> bool:
        every, minutes = self.cfg.checkpoint_every, self.cfg.checkpoint_minutes
        if every is not None and state.step % every == 0:
            return True
        # every process must agree: rank 0's clock decides (no exchange when there is no time rule)
        return minutes is not None and bool(D.broadcast_object(time.monotonic() - self.last_time >= 60 * minutes))

    def save(self, state: TrainState, hooks: Hooks) -> None:
        checkpoints.save(self.directory, state, self.fingerprint, hooks.state_dict())
        D.barrier()
        self.last_time = time.monotonic()


class MetricsLog:
    """`metrics.jsonl` of a training run (rank 0): one JSON line per logged record. With `rewrite` (a checkpointed
    run) it first becomes the records of the state's history - a resumed run's file thus ends as the file of a run
    that was never stopped, and a run that starts over drops the lines of the attempt it replaces."""

    def __init__(self, path: str | Path | None, state: TrainState, rewrite: bool,
                 forward: Callable[[dict], None] | None = None):
        self.state = state
        self.forward = forward if D.is_main() else None  # each new record, to a tracker
        self.file = None
        if path is not None and D.is_main():
            path = Path(path)
            if rewrite:
                atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in state.history))
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def write(self, record: dict) -> None:
        self.state.history.append(record)
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.forward is not None:
            self.forward(record)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def train(
    model: nn.Module,
    train_data: Sequence,
    cfg: TrainConfig,
    *,
    seed: int,
    hooks: Hooks | None = None,
    checkpoint_dir: str | Path | None = None,
    metrics_path: str | Path | None = None,
    display: Display | None = None,
    progress: bool | None = None,
    device: torch.device | str | None = None,
) -> TrainResult:
    """Train `model` (its trainable parameters) on `train_data` with `hooks` (plain causal LM by default) and
    return what happened.

    - Evaluation (when the hooks evaluate) runs every `cfg.eval_every` optimizer steps (else once per epoch) and at
      the end; `hooks.select` names the metric that early stopping and best-weight selection use, and with
      `restore_best` (default: when early stopping is on) the best evaluation's weights are loaded at the end.
    - `checkpoint_dir`: checkpoint and resume (module doc). `metrics_path`: every logged record as a JSON line.
    - A non-finite loss raises `NonFiniteLoss(step, value)`; so does a non-finite gradient norm without an fp16
      loss scaler (clipping would turn it into zero gradients: a step that silently trains nothing). With the
      scaler, such steps are skipped and the scale lowered, as mixed precision intends.
    - `device`: where to train (default: this process's, `lmlab.engine.distributed.device()`: its GPU where there
      is one); tests that compare with a CPU reference pin `device="cpu"`.
    """
    hooks = hooks if hooks is not None else Hooks()
    display = display if display is not None else Display()
    if progress is not None:
        display = dataclasses.replace(display, progress=progress)  # the caller's Display is left as it was
    D.seed_everything(seed)
    device, world = torch.device(device) if device is not None else D.device(), D.world_size()
    if device.type == "cuda" and device.index is None:  # "cuda": this process's GPU (DDP needs the index)
        device = D.device() if D.uses_gpu() else torch.device("cuda", torch.cuda.current_device())
    D.split_batch(cfg.batch_size, world)  # a global batch the processes cannot share evenly is refused first
    n = len(train_data)
    if n == 0:
        raise ValueError("no training examples")
    model.to(device)
    check_kernels(model, cfg.kernels, device)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    groups = param_groups(model, cfg.lr, cfg.weight_decay, hooks.param_rules())
    for g in groups:
        g["initial_lr"] = g["lr"]
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype(device, cfg.precision) == torch.float16 else None
    state = TrainState(model, build_optimizer(groups, cfg.lr, device), trainable, scaler,
                       total_steps=total_steps(n, cfg))
    steps, per_epoch = state.total_steps, steps_per_epoch(n, cfg)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_ratio * steps))
    eval_every = cfg.eval_every or per_epoch
    restore = cfg.early_stopping_patience is not None if hooks.restore_best is None else hooks.restore_best

    checkpointer = resumed_from = None
    if checkpoint_dir is not None:
        fingerprint = {"train": cfg.fingerprint(), "seed": seed, "examples": n, "world": world,
                       "parameters": [[name, list(p.shape)] for name, p in trainable]}
        checkpointer = Checkpointer(Path(checkpoint_dir), cfg, fingerprint, display)
        if checkpointer.resume(state, hooks):
            resumed_from = state.step
    # with checkpoints, this training owns its metrics file: it starts as the state's history (empty when fresh)
    metrics = MetricsLog(metrics_path, state, rewrite=checkpointer is not None, forward=display.record)
    hooks.begin(state, resumed=resumed_from is not None)
    bar = tqdm(total=steps, initial=state.step, desc=display.desc, disable=not (display.progress and D.is_main()),
               leave=False, dynamic_ncols=True, position=display.position)
    try:
        with (kernels(model, cfg.kernels, device), attention(model, cfg.attention, device),
              activation_checkpointing(model, cfg.gradient_checkpointing),
              loss_settings(None if cfg.compile else cfg.loss_chunk, cfg.kernels), PeakMemory(device) as memory,
              STOP.watch()):
            if not state.finished:
                wrapped = _wrapped(model, cfg, world, device)
                model.train()
                started, window = time.perf_counter() - state.train_time_s, _Window()
                for epoch, micro in _step_plan(n, cfg, seed, world, steps, start=state.step):
                    state.epoch = epoch
                    factor = lr_factor(state.step, warmup, steps, cfg.schedule, cfg.min_lr_ratio)
                    for g in state.optimizer.param_groups:
                        g["lr"] = g["initial_lr"] * factor
                    loss, logs, stats, stop = _forward_backward(state, hooks, wrapped, train_data, micro, device,
                                                                world, cfg)
                    grad_norm = _optimizer_step(state, hooks, cfg)
                    state.step += 1
                    state.final_loss = loss
                    hooks.after_step(state)
                    window.tokens += stats["tokens"]
                    if state.step % cfg.log_every == 0 or state.step == steps:
                        metrics.write({"step": state.step, "kind": "train", "epoch": state.epoch, "loss": loss,
                                       "lr": cfg.lr * factor, "tokens_per_s": window.rate(),
                                       **({} if grad_norm is None else {"grad_norm": grad_norm}), **logs})
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                    bar.update(1)
                    if hooks.evaluates and (state.step % eval_every == 0 or state.step == steps):
                        paused = time.perf_counter()
                        state.stopped_early = _evaluate(state, hooks, metrics, restore, cfg) and state.step < steps
                        started += time.perf_counter() - paused  # evaluation time is not training time
                    state.train_time_s = time.perf_counter() - started
                    # one process stops as soon as it is asked; several agree through the next step's reduction
                    if stop or (world == 1 and STOP.requested):
                        if checkpointer is not None:
                            checkpointer.save(state, hooks)
                        raise TrainingInterrupted(STOP.signum or 2)
                    if state.stopped_early:
                        break
                    if checkpointer is not None and state.step < steps and checkpointer.due(state):
                        checkpointer.save(state, hooks)
                state.finished = True
                if checkpointer is not None:  # a resume after this point returns the finished run at once
                    checkpointer.save(state, hooks)
    finally:
        bar.close()
        metrics.close()
    if restore and state.best_weights is not None:
        with torch.no_grad():
            for name, p in trainable:
                p.copy_(state.best_weights[name])
    model.eval()
    return TrainResult(steps=state.step, examples=state.examples_seen, tokens=state.tokens_seen,
                       train_time_s=state.train_time_s, final_loss=state.final_loss, peak_mem_mb=memory.mb,
                       history=state.history, best=state.best, stopped_early=state.stopped_early,
                       resumed_from=resumed_from)


class _Window:
    """Tokens per second since the last logged record."""

    def __init__(self):
        self.tokens, self.start = 0, time.perf_counter()

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.start, 1e-9)
        self.tokens, self.start = 0, now
        return rate


def _wrapped(model: nn.Module, cfg: TrainConfig, world: int, device: torch.device) -> nn.Module:
    """The model as the forward pass calls it: under DDP with several processes, compiled with `compile`."""
    wrapped = model
    if world > 1:
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.ddp_find_unused_parameters)
    return torch.compile(wrapped) if cfg.compile else wrapped


def _forward_backward(state: TrainState, hooks: Hooks, wrapped: nn.Module, data: Sequence, micro: list, device,
                      world: int, cfg: TrainConfig) -> tuple[float, dict, dict, bool]:
    """One step's micro-batches: summed losses backpropagated, then reduced over processes with the step's token
    counts, log terms and any stop request. Returns (global per-unit loss, per-unit log terms, counts, stop)."""
    total = torch.zeros(4, device=device, dtype=torch.float64)  # loss sum, units, tokens, examples
    logs: dict[str, torch.Tensor] = {}
    for m, part in enumerate(micro):
        batch = _to_device(hooks.collate([data[i] for i, _ in part]), device)
        real = 0.0 if part[0][1] else 1.0  # a ghost adds zeros (not nothing): every rank reduces the same terms
        sync = m == len(micro) - 1
        with wrapped.no_sync() if (world > 1 and not sync) else contextlib.nullcontext():
            with _autocast(device, cfg.precision):
                out = hooks.loss(state, wrapped, batch)
            loss = out.total.float() * real
            (state.scaler.scale(loss) if state.scaler is not None else loss).backward()
        total[0] += loss.detach().double()
        total[1] += real * torch.as_tensor(out.weight, dtype=torch.float64, device=device)
        total[2] += real * _count_tokens(batch)
        total[3] += real * len(part)
        for k, v in out.logs.items():
            logs[k] = logs.get(k, 0) + real * torch.as_tensor(v, dtype=torch.float64, device=device).detach()
    stop = torch.tensor([1.0 if STOP.requested else 0.0], device=device, dtype=torch.float64)
    reduced = D.all_reduce_sum(torch.cat([total, stop, torch.stack(list(logs.values())).reshape(-1)
                                          if logs else total.new_zeros(0)]))
    loss_sum, units = float(reduced[0]), max(float(reduced[1]), 1.0)
    state.tokens_seen += int(reduced[2])
    state.examples_seen += int(reduced[3])
    loss = loss_sum / units
    if not math.isfinite(loss):
        raise NonFiniteLoss(state.step + 1, loss)
    if state.scaler is not None:
        state.scaler.unscale_(state.optimizer)
    grad_scale = world / units  # DDP averaged the summed gradients over ranks; make them per-unit means
    for _, p in state.trainable:
        if p.grad is not None:
            p.grad.mul_(grad_scale)
    per_unit = {k: float(v) / units for k, v in zip(logs, reduced[5:], strict=True)}
    return loss, per_unit, {"tokens": int(reduced[2])}, bool(reduced[4] > 0)


def _optimizer_step(state: TrainState, hooks: Hooks, cfg: TrainConfig) -> float | None:
    """Auxiliary loss, after-backward hook, clipping and the optimizer step; returns the gradient norm."""
    aux = hooks.aux_loss(state)
    if aux is not None and aux.requires_grad:
        aux.backward()
    hooks.after_backward(state)
    grad_norm = None
    if cfg.max_grad_norm is not None:
        grad_norm = float(torch.nn.utils.clip_grad_norm_([p for _, p in state.trainable], cfg.max_grad_norm))
        if state.scaler is None and not math.isfinite(grad_norm):
            raise NonFiniteLoss(state.step + 1, grad_norm, "gradient norm")
    if state.scaler is not None:
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _evaluate(state: TrainState, hooks: Hooks, metrics: MetricsLog, restore: bool, cfg: TrainConfig) -> bool:
    """Evaluate, track the best evaluation (and a copy of its weights); True when early stopping says stop."""
    state.model.eval()
    with torch.no_grad():
        result = hooks.evaluate(state) or {}
    state.model.train()
    metrics.write({"step": state.step, "kind": "eval", **result})
    score = result.get(hooks.select)
    if score is None or not math.isfinite(score):
        return False
    best = state.best
    if best is None or (score > best[hooks.select] if hooks.higher_is_better else score < best[hooks.select]):
        state.best = {"step": state.step, **result}
        state.evals_since_best = 0
        if restore:
            state.best_weights = {name: p.detach().clone() for name, p in state.trainable}
    else:
        state.evals_since_best += 1
    return cfg.early_stopping_patience is not None and state.evals_since_best >= cfg.early_stopping_patience
