"""The dense baseline of the MU study (docs/mu.md section 2): a standard causal pre-norm GPT, nanoGPT-style.

Its attention and MLP modules are also MU's cross-block attention and feed-forward, so the two models
differ only in what MU adds.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmlab.kernels import causal_attention
from lmlab.mu.config import DenseConfig

INIT_STD = 0.02  # GPT-2 / nanoGPT initialisation


class CausalSelfAttention(nn.Module):
    """Causal multi-head self-attention with a fused qkv projection (`lmlab.kernels.causal_attention`)."""

    def __init__(self, width: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads)
        y = causal_attention(qkv, self.n_heads, C // self.n_heads, self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.reshape(B, T, C)))  # y: [B, T, H, hd]


class MLP(nn.Module):
    """GELU feed-forward, `mult` times wider inside."""

    def __init__(self, width: int, mult: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(width, mult * width)
        self.proj = nn.Linear(mult * width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class DenseLayer(nn.Module):
    def __init__(self, config: DenseConfig):
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.width)
        self.attn = CausalSelfAttention(config.width, config.n_heads, config.dropout)
        self.ln_mlp = nn.LayerNorm(config.width)
        self.mlp = MLP(config.width, 4, config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp(self.ln_mlp(x))


class LayerStack(nn.Module):
    """What lmlab's models (MU, dense) share with Hugging Face models for training: the output layer
    (`get_output_embeddings`, which the chunked loss reads) and gradient checkpointing of the layers."""

    gradient_checkpointing: bool = False
    head: nn.Linear

    def get_output_embeddings(self) -> nn.Linear:
        return self.head

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """While training, recompute each layer in the backward pass instead of keeping its activations
        (`torch.utils.checkpoint`, non-reentrant: dropout draws the same masks again)."""
        self.gradient_checkpointing = enabled

    def run_layer(self, layer: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *inputs, use_reentrant=False)
        return layer(*inputs)


class DenseModel(LayerStack):
    """`model(input_ids [B, T]) -> logits [B, T, V]`."""

    def __init__(self, config: DenseConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.width)
        self.pos_emb = nn.Embedding(config.max_seq_len, config.width)
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(DenseLayer(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        init_weights(self, residual_branches=2 * config.n_layers)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.tok_emb(input_ids) + self.pos_emb(positions(input_ids, self.config.max_seq_len)))
        for layer in self.layers:
            x = self.run_layer(layer, x)
        return self.head(self.ln_f(x))


def positions(input_ids: torch.Tensor, max_seq_len: int) -> torch.Tensor:
    """Positions 0..T-1 of a [B, T] batch; longer inputs than the position table are an error."""
    length = input_ids.shape[1]
    if length > max_seq_len:
        raise ValueError(f"input has {length} tokens but the model's max_seq_len is {max_seq_len}")
    return torch.arange(length, device=input_ids.device)


def init_weights(model: nn.Module, residual_branches: int) -> None:
    """GPT-2 initialisation: N(0, 0.02) weights, zero biases, and every projection that writes into the
    residual stream (`*.proj.weight`) scaled by 1/sqrt(branches) so the stream's variance does not grow
    with depth."""
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(param)
        elif param.ndim >= 2:
            std = INIT_STD / math.sqrt(residual_branches) if name.endswith("proj.weight") else INIT_STD
            nn.init.normal_(param, mean=0.0, std=std)
