"""Losses and batches of causal language modelling, as the training loop and the evaluations use them: a loss
is a SUM over its units with the number of units (see lmlab.engine.train for why), and batches are right-padded
with labels -100 on padding.

How `causal_lm_loss` forms the logits is a setting of the block it runs in (`loss_settings`, which the training
loop enters with `train.loss_chunk` and `train.kernels`): the plain path (full logits), or the LM head and the
cross-entropy chunk by chunk of tokens without the full logits (lmlab.engine.lmhead) - the same loss and
gradients to float rounding.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.engine import lmhead
from lmlab.engine.nll import IGNORE_INDEX, token_nll


@dataclass(frozen=True)
class LossSettings:
    """`chunk`: `train.loss_chunk` (tokens per chunk, `auto`, or 0 / None for the plain path); `kernels`:
    `train.kernels` (`liger`: liger-kernel's fused linear cross-entropy on CUDA)."""

    chunk: int | str | None = None
    kernels: str = "torch"


_SETTINGS: contextvars.ContextVar[LossSettings | None] = contextvars.ContextVar("lmlab_loss_settings", default=None)


@contextlib.contextmanager
def loss_settings(chunk: int | str | None = None, kernels: str = "torch") -> Iterator[LossSettings]:
    """`causal_lm_loss` within the block uses these settings (module doc)."""
    token = _SETTINGS.set(LossSettings(chunk, kernels))
    try:
        yield LossSettings(chunk, kernels)
    finally:
        _SETTINGS.reset(token)


@dataclass
class LossOut:
    """A micro-batch's loss as a SUM over its units, the number of units, and summed terms to log."""

    total: torch.Tensor
    weight: float | torch.Tensor
    logs: dict[str, torch.Tensor | float] = field(default_factory=dict)



def model_logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def causal_lm_loss(model: nn.Module, batch: dict, settings: LossSettings | None = None) -> LossOut:
    """Summed next-token NLL over positions whose label is not -100 (padding is never in the loss).

    With `loss_weights` in the batch (one per token, like `labels`) it is the weighted sum and the weight is the
    summed weights: a weighted token mean over the global batch. `settings`: how the logits are formed (module
    doc; default: those of the enclosing `loss_settings` block, else the plain path).
    """
    labels = batch["labels"]
    weights = batch.get("loss_weights")
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "loss_weights")}
    # position t predicts label t+1: shift the labels (the last position predicts nothing) rather than copy
    # the logits without their last position
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    settings = settings or _SETTINGS.get() or LossSettings()
    head = lmhead.output_head(model) if settings.chunk not in (None, 0) or settings.kernels == "liger" else None
    if head is not None:
        chunked = _head_loss(model, inputs, head, shift_labels, weights, settings)
        if chunked is not None:
            return chunked
    logits = model_logits(model(**inputs))
    if weights is not None:
        shift_weights = F.pad(weights[:, 1:], (0, 1)) * (shift_labels != IGNORE_INDEX)
        rows = F.cross_entropy(logits.flatten(0, 1).float(), shift_labels.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="none")
        nll = (rows * shift_weights.flatten()).sum()
        return LossOut(nll, shift_weights.sum(), {"nll": nll.detach()})
    nll = token_nll(logits.flatten(0, 1), shift_labels.flatten())
    count = (shift_labels != IGNORE_INDEX).sum()
    return LossOut(nll, count, {"nll": nll.detach()})


def _head_loss(model: nn.Module, inputs: dict, head: nn.Linear, shift_labels: torch.Tensor,
               weights: torch.Tensor | None, settings: LossSettings) -> LossOut | None:
    """The loss through the head without the full logits (lmlab.engine.lmhead); None: this batch takes the plain
    path (`auto` below its size, or a model whose forward did not pass its head)."""
    labels = shift_labels.flatten()
    liger = settings.kernels == "liger" and weights is None and labels.is_cuda
    chunk = lmhead.chunk_size(settings.chunk, labels.numel(), head.out_features)
    if chunk is None and not liger:
        return None
    with lmhead.hidden_states_of(head) as seen:
        model(**inputs)
    if len(seen) != 1 or seen[0].shape[:-1].numel() != labels.numel():
        raise RuntimeError(f"{type(model).__name__}'s forward called its output layer {len(seen)} time(s) with "
                           f"{[tuple(h.shape) for h in seen]}: set train.loss_chunk=0 for this model")
    hidden = seen[0].reshape(labels.numel(), -1)
    if liger:
        nll = lmhead.liger_loss(hidden, head, labels)
        return LossOut(nll, (labels != IGNORE_INDEX).sum(), {"nll": nll.detach()})
    if weights is None:
        nll = lmhead.linear_nll(hidden, head.weight, head.bias, labels, chunk=chunk)
        return LossOut(nll, (labels != IGNORE_INDEX).sum(), {"nll": nll.detach()})
    shift_weights = F.pad(weights[:, 1:], (0, 1)) * (shift_labels != IGNORE_INDEX)
    nll = lmhead.linear_nll(hidden, head.weight, head.bias, labels, shift_weights.flatten(), chunk=chunk)
    return LossOut(nll, shift_weights.sum(), {"nll": nll.detach()})


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
