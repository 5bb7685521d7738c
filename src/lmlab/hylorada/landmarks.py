"""Landmarks: K learned vectors mixed into hidden states by a per-token softmax gate (docs/hylorada.md s. 4-5).

    position_adaptive / learnable_bucket (after the final norm):
        g_t = softmax(P[bucket(p)] + W_c h_t)          (learnable_bucket: w(p) @ P instead of P[bucket(p)])
        h'_t = h_t + scale * dropout(g_t L)
    original (after the final norm) and per_layer (after every block, K/2 vectors each):
        g_t = softmax(W_g prefix_mean(h)_t)             causal: token t pools tokens 0..t only
        h'_t = h_t + scale * dropout(g_t L)
    constant (a control, after the final norm):
        g = softmax(c)                                  c [K]: the same for every token and sequence
        h'_t = h_t + scale * dropout(g L)               a learned constant vector: no position, no content
    original_leaky (a diagnostic, labelled invalid by the studies): `original` pooling over the WHOLE sequence,
        future tokens included, as the notes' code did - every token's gate sees what comes after it.

The modules are attached to the model by forward hooks (see `model.py`) and read token positions from
the model's shared `PositionContext`.
"""

from __future__ import annotations

import torch
from torch import nn

from lmlab.hylorada.position import LearnableBuckets, PositionContext


def sequence_mean(
    hidden: torch.Tensor, token_mask: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """NON-causal mean over all real tokens of the sequence, the same for every position (the leak of the notes'
    landmark code: token t sees tokens after t). Same arguments and returns as `prefix_mean`."""
    mask = token_mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
    sums = (hidden * mask).sum(1)  # [B, d]
    counts = mask.sum(1)  # [B, 1]
    if past is not None:
        sums = sums + past[0]
        counts = counts + past[1]
    means = (sums / counts.clamp_min(1)).unsqueeze(1).expand_as(hidden)
    return means, (sums.detach(), counts.detach())


def prefix_mean(
    hidden: torch.Tensor, token_mask: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Causal mean over real tokens: out[:, t] = mean of hidden[:, s] for real s <= t (plus the cached past).

    hidden [B, T, d], token_mask [B, T] bool, past = (sum [B, d], count [B, 1]) of earlier decoding steps.
    Returns the means [B, T, d] and the running (sum, count) to carry to the next step.
    """
    mask = token_mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
    sums = (hidden * mask).cumsum(1)  # [B, T, d]
    counts = mask.cumsum(1)  # [B, T, 1]
    if past is not None:
        sums = sums + past[0].unsqueeze(1)
        counts = counts + past[1].unsqueeze(1)
    means = sums / counts.clamp_min(1)  # leading padding has count 0
    return means, (sums[:, -1].detach(), counts[:, -1].detach())


class _Landmarks(nn.Module):
    """What every design shares: its K vectors L (`vectors`), mixed into h by a per-token gate g (its own),
    h' = h + scale * dropout(g L). Subclasses call `init_mix` first (the order of random draws is the spec's)."""

    vectors: nn.Parameter
    scale: nn.Parameter
    dropout: nn.Dropout | None

    def init_mix(self, hidden_size: int, num_landmarks: int, dropout: float, factory: dict) -> None:
        """What every design shares: L [K, d] ~ N(0, 0.02^2), scale 0.1, dropout on the mix."""
        self.vectors = nn.Parameter(torch.randn(num_landmarks, hidden_size, **factory) * 0.02)  # L [K, d]
        self.scale = nn.Parameter(torch.tensor(0.1, **factory))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def mix(self, hidden: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """h + scale * dropout(g L) for the gate g [B, T, K], in h's dtype (float32 landmarks on a bf16 model add
        their mix in bf16: the model's layers after them see the dtype they were built for)."""
        mixed = gate.to(self.vectors.dtype) @ self.vectors  # [B, T, d] (the autocast dtype under autocast)
        if self.dropout is not None:
            mixed = self.dropout(mixed)
        return hidden + (self.scale * mixed).to(hidden.dtype)

    def own(self, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden` in the landmarks' dtype, for their own gate (a no-op unless the model is in another one)."""
        return hidden.to(self.vectors.dtype)

    def after_final_norm(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on the final norm: the LM head sees h' instead of h."""
        return self(output)


class PositionAdaptiveLandmarks(_Landmarks):
    """Landmarks gated by position bucket and content; with `buckets`, soft learnable buckets."""

    def __init__(
        self,
        hidden_size: int,
        num_landmarks: int,
        num_buckets: int,
        dropout: float,
        context: PositionContext,
        buckets: LearnableBuckets | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        factory = {"dtype": dtype, "device": device}
        self.init_mix(hidden_size, num_landmarks, dropout, factory)
        self.position_logits = nn.Parameter(torch.randn(num_buckets, num_landmarks, **factory) * 0.02)  # P [nb, K]
        self.content = nn.Linear(hidden_size, num_landmarks, bias=False, **factory)  # W_c
        self.buckets = buckets
        self.context = context

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        ctx = self.context
        ctx.require_positions(hidden.shape[:2])
        if self.buckets is None:
            position_logits = self.position_logits[ctx.buckets]  # [B, T, K]
        else:
            position_logits = self.buckets(ctx.positions).to(self.position_logits.dtype) @ self.position_logits
        return self.mix(hidden, torch.softmax(position_logits + self.content(self.own(hidden)), dim=-1))


class ConstantLandmarks(_Landmarks):
    """The control for landmark designs: the same K vectors and scale, mixed by a learned softmax that is the same
    for every token (no position, no content information), i.e. a learned constant vector added to h."""

    def __init__(
        self,
        hidden_size: int,
        num_landmarks: int,
        dropout: float,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        factory = {"dtype": dtype, "device": device}
        self.init_mix(hidden_size, num_landmarks, dropout, factory)
        self.logits = nn.Parameter(torch.randn(num_landmarks, **factory) * 0.02)  # c [K]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        gate = torch.softmax(self.logits, dim=-1).expand(*hidden.shape[:-1], -1)  # [B, T, K]
        return self.mix(hidden, gate)


class PooledLandmarks(_Landmarks):
    """Landmarks gated by a causal prefix mean of the hidden states (designs `original` and `per_layer`); with
    `leaky=True` by the mean over the whole sequence (`original_leaky`, a diagnostic of the notes' leak)."""

    def __init__(
        self,
        hidden_size: int,
        num_landmarks: int,
        dropout: float,
        context: PositionContext,
        key: str,
        leaky: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        factory = {"dtype": dtype, "device": device}
        self.init_mix(hidden_size, num_landmarks, dropout, factory)
        self.gate = nn.Linear(hidden_size, num_landmarks, bias=False, **factory)  # W_g
        self.context = context
        self.key = key  # names this module's running sums in the KV cache
        self.pool = sequence_mean if leaky else prefix_mean

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        ctx = self.context
        ctx.require_positions(hidden.shape[:2])
        pooled, running = self.pool(self.own(hidden), ctx.token_mask, ctx.pool_past.get(self.key))
        ctx.pool_now[self.key] = running
        return self.mix(hidden, torch.softmax(self.gate(pooled), dim=-1))

    def after_block(self, module: nn.Module, args: tuple, output):
        """Forward hook on a transformer block (design `per_layer`); blocks may return a tensor or a tuple."""
        if isinstance(output, tuple):
            return (self(output[0]), *output[1:])
        return self(output)
