"""Inference costs measured from model configs and encoded prompts (docs/latentwire.md section 4).

KV-cache bytes per token = 2 (keys and values) x layers x kv_heads x head_dim x bytes per element, read
from the config, so grouped-query attention (fewer kv heads than query heads) is counted as it is stored.
"""

from __future__ import annotations

import torch
from torch import nn


def kv_layout(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a Hugging Face decoder config (Llama/Mistral GQA, GPT-2, ...)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = text.num_hidden_layers
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return layers, kv_heads, head_dim


def kv_bytes_per_token(config, bytes_per_element: int) -> int:
    layers, kv_heads, head_dim = kv_layout(config)
    return 2 * layers * kv_heads * head_dim * bytes_per_element


def kv_cache_bytes(config, tokens: float, bytes_per_element: int) -> float:
    """Bytes the KV cache holds for `tokens` positions (a mean over items may be fractional)."""
    return kv_bytes_per_token(config, bytes_per_element) * tokens


def element_bytes(model: nn.Module) -> int:
    """Bytes per element of the model's weights, which is what its KV cache is stored in."""
    param = next(model.parameters(), None)
    return param.element_size() if param is not None else torch.get_default_dtype().itemsize


def prompt_lengths(attention_mask: torch.Tensor) -> list[int]:
    """Real (unpadded) positions per row of a prompt's attention mask [B, T]."""
    return attention_mask.long().sum(-1).tolist()
