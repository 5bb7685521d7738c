"""Extending the base model's context before fine-tuning (docs/hylorada.md section 7).

RoPE models get `rope_parameters` (transformers 5's name for `rope_scaling`) set on the config BEFORE the
model is built - rotary frequencies are computed at construction, so setting it afterwards has no
effect (the original code's mistake). GPT-2's learned position table is stretched by interpolation.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import ConfigError
from lmlab.models.hf import context_length

# The table sizes a model's learned position table went through (e.g. [1024, 2048]), kept on the model so that
# `save_adapter` records the stretch and `load_adapter` repeats it on a fresh base.
INTERPOLATED = "_lmlab_interpolated_positions"


def rope_scaling(config, max_length: int, kind: Literal["linear", "dynamic", "yarn"] = "linear"):
    """A copy of a Hugging Face config whose RoPE covers `max_length` tokens; build the model from it.

    factor = max_length / the config's context. `linear` interpolates positions, `dynamic` rescales the
    base only for sequences longer than the original context, `yarn` interpolates by frequency band. If
    the config already covers `max_length`, the copy is unchanged.
    """
    if kind not in ("linear", "dynamic", "yarn"):
        raise ConfigError(f"rope scaling kind '{kind}' is not one of linear, dynamic, yarn")
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict) or "rope_theta" not in rope:
        raise ConfigError(
            f"model type '{getattr(config, 'model_type', '?')}' does not use RoPE: extend a learned position table "
            "with interpolate_position_embeddings or train_embeddings=True"
        )
    original = context_length(config)
    new = copy.deepcopy(config)
    if original is None or max_length <= original:
        return new
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"the config already has RoPE scaling '{rope['rope_type']}' for {original} tokens; "
                          f"refusing to replace it to reach max_length={max_length}")
    params = {"rope_type": kind, "factor": max_length / original, "rope_theta": rope["rope_theta"]}
    if "partial_rotary_factor" in rope:
        params["partial_rotary_factor"] = rope["partial_rotary_factor"]
    if kind == "yarn":
        params["original_max_position_embeddings"] = original
    new.rope_parameters = params
    if kind != "dynamic":
        # dynamic NTK reads max_position_embeddings as the pretrained length it scales beyond
        new.max_position_embeddings = max_length
    if hasattr(new, "validate_rope"):
        new.validate_rope()
    return new


@torch.no_grad()
def interpolate_position_embeddings(model: nn.Module, max_length: int) -> nn.Module:
    """Stretch a learned absolute position table (GPT-2 `wpe`) to `max_length` rows by linear interpolation.

    Row j of the new table is the old table at position j * (n_old - 1) / (max_length - 1), so the first
    and last rows are kept. Changes the model and its config in place, and notes the sizes on the model
    (`save_adapter` records them, `load_adapter` stretches a fresh base the same way); returns the model.
    """
    table = position_table(model)
    original = table.num_embeddings
    if max_length <= original:
        return model
    old = table.weight  # [n_old, d]
    new = F.interpolate(old.t().unsqueeze(0).float(), size=max_length, mode="linear", align_corners=True)
    table.weight = nn.Parameter(new[0].t().to(old.dtype).contiguous(), requires_grad=old.requires_grad)
    table.num_embeddings = max_length
    model.config.max_position_embeddings = max_length
    setattr(model, INTERPOLATED, [*(getattr(model, INTERPOLATED, None) or [original]), max_length])
    return model


def position_table(model: nn.Module) -> nn.Embedding:
    """The model's single learned absolute position table (GPT-2 `wpe`): an embedding other than the token
    embeddings with as many rows as the model's context."""
    original = context_length(model.config)
    token_embeddings = model.get_input_embeddings()
    tables = [m for m in model.modules()
              if isinstance(m, nn.Embedding) and m is not token_embeddings and m.num_embeddings == original]
    if len(tables) != 1:
        raise ConfigError(f"{type(model).__name__} has no single learned position table of {original} rows "
                          "(RoPE models use rope_scaling instead)")
    return tables[0]
