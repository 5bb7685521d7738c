"""Losses and batches of causal language modelling, as the training loop and the evaluations use them: a loss
is a SUM over its units with the number of units (see lmlab.engine.train for why), and batches are right-padded
with labels -100 on padding."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.engine.nll import IGNORE_INDEX, token_nll


@dataclass
class LossOut:
    """A micro-batch's loss as a SUM over its units, the number of units, and summed terms to log."""

    total: torch.Tensor
    weight: float | torch.Tensor
    logs: dict[str, torch.Tensor | float] = field(default_factory=dict)



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
