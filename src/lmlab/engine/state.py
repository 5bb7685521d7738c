"""The training state and its checkpoints (docs/architecture.md, "Training engine").

`TrainState` holds everything an optimizer step depends on besides the model's frozen weights and the data:
the step (which fixes the position in the data order, a seeded permutation per epoch), the optimizer and
gradient-scaler state, the RNG states of every generator the step may draw from, the best evaluation so far with
a copy of its weights, the early-stopping counter, the metric history and the state of the method's hooks.

A checkpoint is one directory `<dir>/step-<N>/` with

- `tensors.safetensors`: the trainable weights (`model.<name>`: only an adapter's for a frozen base), the
  optimizer's per-parameter tensors (`optim.<i>.<key>`), the best weights (`best.<name>`) and the torch RNG
  states (`rng.cpu`, `rng.cuda.<rank>.<device>`);
- `state.json`: everything else, as JSON (no pickle anywhere), including a fingerprint of what the run trains.

It is written into `<dir>/.step-<N>.tmp-<pid>/`, synced, and renamed to its final name - a rename is atomic, so a
checkpoint directory with its final name is complete - and only then are older checkpoints removed: a process
killed at any moment leaves the previous checkpoint or the new one, never half of one. `latest()` picks the
complete checkpoint of the highest step; one that cannot be read, or that belongs to another run (another
fingerprint), is refused with one line naming the file and training starts from scratch.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from lmlab.engine import distributed as D
from lmlab.errors import CheckpointError
from lmlab.fileio import read_tensors

FORMAT = 1
PREFIX = "step-"


@dataclass
class TrainState:
    """Everything a training step depends on (module doc). `model` and `optimizer` are the live objects; the
    rest are plain values the loop updates."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    trainable: list[tuple[str, torch.nn.Parameter]]
    scaler: torch.amp.GradScaler | None = None
    step: int = 0  # optimizer steps done
    epoch: int = 0
    total_steps: int = 0
    examples_seen: int = 0
    tokens_seen: int = 0
    train_time_s: float = 0.0
    final_loss: float | None = None
    history: list[dict] = field(default_factory=list)
    best: dict | None = None
    best_weights: dict[str, torch.Tensor] | None = None
    evals_since_best: int = 0
    stopped_early: bool = False
    finished: bool = False

    # --- saving ---------------------------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"model.{name}": p.detach() for name, p in self.trainable}
        params = {id(p): i for i, (_, p) in enumerate(self.trainable)}
        for p, s in self.optimizer.state.items():
            for key, value in s.items():
                if torch.is_tensor(value):
                    out[f"optim.{params[id(p)]}.{key}"] = value.detach()
        for name, value in (self.best_weights or {}).items():
            out[f"best.{name}"] = value
        return {k: v.contiguous().cpu() for k, v in out.items()}

    def values(self) -> dict:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        return {"step": self.step, "epoch": self.epoch, "total_steps": self.total_steps,
                "examples_seen": self.examples_seen, "tokens_seen": self.tokens_seen,
                "train_time_s": self.train_time_s, "final_loss": self.final_loss, "history": self.history,
                "best": self.best, "has_best_weights": self.best_weights is not None,
                "evals_since_best": self.evals_since_best, "stopped_early": self.stopped_early,
                "finished": self.finished, "param_groups": groups,
                "scaler": None if self.scaler is None else self.scaler.state_dict()}

    # --- loading --------------------------------------------------------------------------------------

    def load(self, values: dict, tensors: dict[str, torch.Tensor], where: Path) -> None:
        """Put a checkpoint's values and tensors into this state (the live model and optimizer included). Everything
        is checked before anything changes: a CheckpointError leaves the state as it was."""
        weights = {name: _tensor(tensors, f"model.{name}", where, p.shape) for name, p in self.trainable}
        best = None
        if values["has_best_weights"]:
            best = {name: _tensor(tensors, f"best.{name}", where, p.shape) for name, p in self.trainable}
        if len(values["param_groups"]) != len(self.optimizer.param_groups):
            raise CheckpointError(f"{where}: {len(values['param_groups'])} optimizer groups, this run has "
                                  f"{len(self.optimizer.param_groups)}")
        with torch.no_grad():
            for name, p in self.trainable:
                p.copy_(weights[name])
        for i, (_, p) in enumerate(self.trainable):
            keys = [k for k in tensors if k.startswith(f"optim.{i}.")]
            if keys:
                self.optimizer.state[p] = {k.split(".", 2)[2]: tensors[k].to(p.device) for k in keys}
        for group, saved in zip(self.optimizer.param_groups, values["param_groups"], strict=True):
            group.update(saved)
        if self.scaler is not None and values.get("scaler"):
            self.scaler.load_state_dict(values["scaler"])
        self.best_weights = None if best is None else {
            name: best[name].to(p.device) for name, p in self.trainable}
        for key in ("step", "epoch", "total_steps", "examples_seen", "tokens_seen", "train_time_s", "final_loss",
                    "history", "best", "evals_since_best", "stopped_early", "finished"):
            setattr(self, key, values[key])


def _tensor(tensors: dict, key: str, where: Path, shape) -> torch.Tensor:
    value = tensors.get(key)
    if value is None or tuple(value.shape) != tuple(shape):
        found = "missing" if value is None else f"shape {tuple(value.shape)}"
        raise CheckpointError(f"{where}: tensor '{key}' is {found}, this run needs shape {tuple(shape)}")
    return value


# --- RNG states ---------------------------------------------------------------------------------------


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """This process's RNG states: (JSON values, tensors)."""
    values: dict = {"python": random.getstate()}  # tuples: JSON writes them as lists
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        kind, keys, pos, has_gauss, gauss = numpy.random.get_state()
        values["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]
    tensors = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return values, tensors


def set_rng_state(values: dict, tensors: dict[str, torch.Tensor]) -> None:
    random.setstate(_tupled(values["python"]))
    numpy = sys.modules.get("numpy")
    if numpy is not None and values.get("numpy") is not None:
        kind, keys, pos, has_gauss, gauss = values["numpy"]
        numpy.random.set_state((kind, numpy.array(keys, dtype=numpy.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


def _tupled(value):
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


# --- checkpoint directories ----------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def complete_checkpoints(directory: Path) -> list[Path]:
    """The complete checkpoints in `directory`, highest step first (temporary directories are not)."""
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit():
            found.append((int(p.name[len(PREFIX):]), p))
    return [p for _, p in sorted(found, reverse=True)]


def save(directory: Path, state: TrainState, fingerprint: dict, hooks_state: dict) -> Path | None:
    """Write `state` as the checkpoint of its step (module doc); rank 0 writes, every rank's RNG state goes in.
    Returns the checkpoint's path on rank 0."""
    rng_values, rng_tensors = rng_state()
    if D.is_distributed():  # every rank's states travel as lists; one process keeps its tensors as they are
        per_rank = [(v, {k: torch.tensor(t, dtype=torch.uint8) for k, t in saved.items()}) for v, saved in
                    D.gather_objects((rng_values, {k: t.tolist() for k, t in rng_tensors.items()}))]
    else:
        per_rank = [(rng_values, rng_tensors)]
    if not D.is_main():
        return None
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / checkpoint_name(state.step)
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = state.tensors()
    for rank, (_, saved) in enumerate(per_rank):
        for key, value in saved.items():
            tensors[f"{key}.rank{rank}"] = value
    save_file(tensors, str(tmp / "tensors.safetensors"))
    values = {"format": FORMAT, "fingerprint": fingerprint, **state.values(), "hooks": hooks_state,
              "rng": [v for v, _ in per_rank]}
    (tmp / "state.json").write_text(json.dumps(values, separators=(",", ":")) + "\n", encoding="utf-8")
    for f in ("tensors.safetensors", "state.json"):
        with open(tmp / f, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():  # a checkpoint of this step from an earlier, interrupted attempt
        shutil.rmtree(final)
    os.rename(tmp, final)
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    for older in complete_checkpoints(directory)[1:]:
        shutil.rmtree(older, ignore_errors=True)
    for leftover in directory.glob(f".{PREFIX}*.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return final


@dataclass
class Checkpoint:
    path: Path
    values: dict
    tensors: dict[str, torch.Tensor]

    def restore(self, state: TrainState) -> None:
        """Into `state`, and this process's RNG states."""
        rank = D.rank()
        rng = {k[: -len(f".rank{rank}")]: v for k, v in self.tensors.items() if k.endswith(f".rank{rank}")}
        if "rng.cpu" not in rng or rank >= len(self.values.get("rng") or []):
            raise CheckpointError(f"{self.path / 'tensors.safetensors'}: no RNG state for process {rank}")
        state.load(self.values, self.tensors, self.path)
        set_rng_state(self.values["rng"][rank], rng)


def read(path: Path, fingerprint: dict) -> Checkpoint:
    """A checkpoint directory's contents, checked against this run's fingerprint (CheckpointError naming the
    file otherwise)."""
    state_file = path / "state.json"
    try:
        values = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{state_file} cannot be read ({exc})") from None
    if not isinstance(values, dict) or values.get("format") != FORMAT:
        raise CheckpointError(f"{state_file} is not an lmlab training checkpoint (format {FORMAT})")
    if values.get("fingerprint") != fingerprint:
        theirs = values.get("fingerprint") or {}
        differ = sorted(k for k in set(theirs) | set(fingerprint) if theirs.get(k) != fingerprint.get(k))
        raise CheckpointError(f"{state_file} belongs to another training run (it differs in {', '.join(differ)})")
    tensor_file = path / "tensors.safetensors"
    if not tensor_file.exists():
        raise CheckpointError(f"{tensor_file} is missing")
    return Checkpoint(path, values, read_tensors(tensor_file))


def latest(directory: Path, fingerprint: dict, warn) -> Checkpoint | None:
    """The newest usable checkpoint in `directory` (every rank reads the same one), or None. A checkpoint that
    cannot be used is reported through `warn(line)` and removed (rank 0), and training starts from scratch."""
    found = complete_checkpoints(directory)
    if not found:
        return None
    try:
        return read(found[0], fingerprint)
    except CheckpointError as exc:
        discard(directory, f"{exc}; this training starts from the beginning", warn)
        return None


def discard(directory: Path, message: str, warn) -> None:
    """Refuse the checkpoints in `directory`: say why in one line, and remove them (rank 0)."""
    warn(message)
    D.barrier()
    if D.is_main():
        for p in complete_checkpoints(directory):
            shutil.rmtree(p, ignore_errors=True)
