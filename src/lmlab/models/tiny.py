"""Tiny Hugging Face models for the embedded default: their config and a deterministic builder.

Pretraining and caching a tiny base (a recipe: it runs the training loop) lives in `lmlab.studies.pretrain`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from lmlab.config import Section


class TinyModelConfig(Section):
    """A small Llama (RoPE) or GPT-2 (learned positions) causal LM."""

    arch: Literal["llama", "gpt2"] = "llama"
    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int | None = Field(None, ge=1, description="llama only: grouped-query attention heads")
    intermediate_size: int | None = Field(None, ge=1, description="None: 4x hidden (gpt2), ~2.7x (llama)")
    context: int = Field(128, ge=8, description="max_position_embeddings / n_positions")
    tie_embeddings: bool = True
    rope_theta: float = Field(10000.0, gt=0)


def build_tiny(cfg: TinyModelConfig, vocab_size: int, *, bos_id: int, eos_id: int, pad_id: int,
               seed: int = 0) -> PreTrainedModel:
    """A freshly initialised tiny model (deterministic for a seed)."""
    import torch

    torch.manual_seed(seed)
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(f"hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}")
    common = dict(vocab_size=vocab_size, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
                  tie_word_embeddings=cfg.tie_embeddings)
    if cfg.arch == "llama":
        inter = cfg.intermediate_size or int(round(cfg.hidden_size * 8 / 3 / 32)) * 32 or 32
        hf_cfg = LlamaConfig(
            hidden_size=cfg.hidden_size, intermediate_size=inter, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
            max_position_embeddings=cfg.context, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
            attention_dropout=0.0, **common,
        )
        return LlamaForCausalLM(hf_cfg)
    hf_cfg = GPT2Config(
        n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads, n_positions=cfg.context,
        n_inner=cfg.intermediate_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common,
    )
    return GPT2LMHeadModel(hf_cfg)
