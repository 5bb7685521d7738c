"""Token positions, position buckets (fixed and learnable) and the shared position-bias table.

HYLORADA.md sections 2, 3 and 5. A token's position counts real tokens only, so left padding does not
shift it, and during cached decoding a new token's position continues from the cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def bucket_edges(num_buckets: int, max_positions: int, spacing: str = "log") -> list[int]:
    """First position of buckets 1..num_buckets-1 (bucket 0 starts at 0), strictly increasing, < max_positions.

    `log`: edges grow geometrically (max_positions^(k/num_buckets)), so early positions get narrow buckets;
    where the geometric edges are closer than one position apart the buckets are exact (one position each).
    `uniform`: equal widths. Positions at or past the last edge (including past max_positions) are in the
    last bucket.
    """
    if not 2 <= num_buckets <= max_positions:
        raise ValueError(f"need 2 <= num_buckets <= max_positions, got {num_buckets} and {max_positions}")
    edges: list[int] = []
    previous = 0
    for k in range(1, num_buckets):
        if spacing == "log":
            target = round(max_positions ** (k / num_buckets))
        elif spacing == "uniform":
            target = round(k * max_positions / num_buckets)
        else:
            raise ValueError(f"unknown bucket spacing {spacing!r}")
        # at least one position per bucket, and room left for the remaining edges below max_positions
        previous = min(max(previous + 1, target), max_positions - (num_buckets - k))
        edges.append(previous)
    return edges


def bucketize(positions: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Bucket index of each position: the number of edges <= position (any shape, long)."""
    return torch.bucketize(positions, edges, right=True)


def token_positions(
    batch: int,
    length: int,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    past_length: int = 0,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Position of each of the `length` new tokens, [batch, length] long.

    Priority: explicit `position_ids`; else the 2-d attention mask (counting real tokens; during cached
    decoding the mask covers past + new tokens, so its last `length` columns are the new ones); else
    `past_length + arange(length)`. Padding tokens get position 0.
    """
    if position_ids is not None:
        return position_ids.long().expand(batch, length).contiguous()
    if attention_mask is not None and attention_mask.dim() == 2:
        counted = attention_mask.long().cumsum(-1) - 1  # [B, past + T]
        return counted[:, -length:].clamp_min(0)
    positions = torch.arange(past_length, past_length + length, device=device)
    return positions.unsqueeze(0).expand(batch, length).contiguous()


class PositionContext:
    """What every HyLoRADA module of one model needs to know about the tokens of the current forward.

    Filled once per forward of the wrapped model (by its pre-hook), read by adapters and landmarks.
    Prefix sums for causal pooling travel with the KV cache between decoding steps (`pool_past` in,
    `pool_now` out), keyed by the pooling module's name.
    """

    def __init__(self) -> None:
        self.positions: torch.Tensor | None = None  # [B, T] long
        self.buckets: torch.Tensor | None = None  # [B, T] long, fixed scheme
        self.token_mask: torch.Tensor | None = None  # [B, T] bool, real (non-padding) tokens
        self.bias_term: torch.Tensor | None = None  # [B*T, 1] tanh(bias[bucket(p)]), shared by the adapters
        self.pool_past: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pool_now: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def position_bias_term(self, num_tokens: int) -> torch.Tensor:
        """tanh(bias[bucket(p)]) for the tokens of this forward, [num_tokens, 1]."""
        term = self.bias_term
        if term is None or term.shape[0] != num_tokens:
            have = "nothing" if term is None else f"{term.shape[0]} tokens"
            raise RuntimeError(
                f"HyLoRADA position context holds {have} but the layer sees {num_tokens} tokens: call the model "
                "returned by apply_hylorada (its forward computes the positions), not one of its submodules"
            )
        return term

    def require_positions(self, shape: torch.Size) -> None:
        if self.positions is None or self.positions.shape != shape:
            raise RuntimeError(
                f"HyLoRADA position context does not match hidden states of shape {tuple(shape)}: call the model "
                "returned by apply_hylorada, not one of its submodules"
            )


class PositionBias(nn.Module):
    """The learned table `bias: [num_buckets]` (init 0) shared by all adapters of a model (section 3)."""

    def __init__(self, num_buckets: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(num_buckets))

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        """tanh(bias[bucket]) per token: [B, T] -> [B*T, 1]."""
        return torch.tanh(self.table)[buckets.reshape(-1)].unsqueeze(-1)


class LearnableBuckets(nn.Module):
    """Soft bucket assignment with learnable boundaries on u = p / max_positions (section 5).

    q_i = sigmoid((u - b_i) / tau); w_0 = 1 - q_0, w_i = q_{i-1} - q_i, w_last = q_last (b sorted).
    """

    def __init__(self, edges: list[int], max_positions: int, temperature: float) -> None:
        super().__init__()
        initial = torch.tensor(edges, dtype=torch.float32) / max_positions  # [nb-1]
        self.boundaries = nn.Parameter(initial.clone())
        # gaps of the fixed scheme: the diversity penalty measures how far boundaries have closed up
        self.register_buffer("initial_gaps", torch.diff(initial), persistent=False)
        self.max_positions = max_positions
        self.temperature = temperature

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """Bucket weights for each position: [B, T] -> [B, T, nb], rows sum to 1."""
        b = torch.sort(self.boundaries).values
        u = positions.to(b.dtype).unsqueeze(-1) / self.max_positions  # [B, T, 1]
        q = torch.sigmoid((u - b) / self.temperature)  # [B, T, nb-1]
        return torch.cat([1 - q[..., :1], q[..., :-1] - q[..., 1:], q[..., -1:]], dim=-1)

    def diversity_penalty(self) -> torch.Tensor:
        """Mean of relu(1 - gap / initial_gap)^2 over adjacent sorted boundaries.

        Zero while no two boundaries are closer than in the fixed scheme; approaches 1 per gap as two
        boundaries merge. Relative to the initial gaps, so it treats log and uniform spacing alike.
        """
        gaps = torch.diff(torch.sort(self.boundaries).values)
        if gaps.numel() == 0:
            return self.boundaries.sum() * 0
        return F.relu(1 - gaps / self.initial_gaps).pow(2).mean()

    def learned_edges(self) -> list[float]:
        """Current boundaries in token positions, sorted."""
        return (torch.sort(self.boundaries.detach().float()).values * self.max_positions).tolist()



