"""Optimizer parameter groups and learning-rate schedules (docs/protocol.md section 3)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class GroupRule:
    """Parameters whose name matches `pattern` (a regex, `re.search`) get their own optimizer group.

    `lr` sets an absolute learning rate, `lr_scale` multiplies the base one; `weight_decay` overrides
    the default decay. The first matching rule wins.
    """

    pattern: str
    lr: float | None = None
    lr_scale: float | None = None
    weight_decay: float | None = None


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """Norm weights, biases, gates and scalars (every tensor of fewer than 2 dimensions) get no decay."""
    return param.ndim < 2


def param_groups(
    model: nn.Module, lr: float, weight_decay: float, rules: list[GroupRule] | tuple[GroupRule, ...] = ()
) -> list[dict]:
    """Torch optimizer groups over the trainable parameters of `model`, named for logging."""
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        rule = next((r for r in rules if re.search(r.pattern, name)), None)
        group_lr = lr
        decay = 0.0 if is_no_decay(name, param) else weight_decay
        label = "no_decay" if decay == 0.0 else "decay"
        if rule is not None:
            if rule.lr is not None:
                group_lr = rule.lr
            elif rule.lr_scale is not None:
                group_lr = lr * rule.lr_scale
            if rule.weight_decay is not None:
                decay = rule.weight_decay
            label = f"{rule.pattern}|{label}"
        key = (label, group_lr, decay)
        if key not in groups:
            groups[key] = {"name": label, "params": [], "lr": group_lr, "weight_decay": decay}
        groups[key]["params"].append(param)
    return list(groups.values())


def lr_factor(step: int, warmup_steps: int, total_steps: int, kind: str = "cosine", min_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based): linear warmup, then decay."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if kind == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif kind == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"unknown schedule {kind!r}")
    return min_ratio + (1.0 - min_ratio) * shape
