"""Token positions, position buckets (fixed and learnable) and the shared position-bias table.

docs/hylorada.md sections 2, 3 and 5. A token's position counts real tokens only, so left padding does not
shift it, and during cached decoding a new token's position continues from the cache.
"""

from __future__ import annotations

from typing import Literal

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


BoundaryAssignment = Literal["relative", "absolute", "straight_through"]


class LearnableBuckets(nn.Module):
    """Bucket assignment with learnable boundaries on u = p / max_positions (docs/hylorada.md section 5).

        q_i = sigmoid((x(u) - x(b_i)) / tau)     w_0 = 1 - q_0,  w_i = q_{i-1} - q_i,  w_last = q_last   (b sorted)

    Boundary i starts half a position below the fixed scheme's edge e_i (between positions e_i - 1 and e_i, where
    the fixed scheme changes bucket), so every position starts in its fixed bucket. `assignment` chooses x:
    - "relative" (default): x is the fixed scheme's bucket index, continuous (piecewise linear in u through the
      edges: bucket k spans [k, k + 1)), so tau is a fraction of a bucket's width wherever the bucket is - narrow
      early buckets are resolved as well as wide late ones. At 0.1 all num_buckets buckets are distinguishable at
      initialisation and a position puts 88% of its weight on its fixed bucket on average (32 log buckets over 512
      positions; only positions within ~a tenth of a bucket of a boundary are shared);
    - "absolute": x = u, the notes' rule. At 0.1 over 512 positions a sigmoid spans ~50 positions, wider than the
      first 24 log buckets together, so only 8 of 32 buckets are distinguishable (28% of a position's weight on its
      fixed bucket on average): comparing it with fixed buckets confounds learnability with lost resolution;
    - "straight_through": the forward pass is the hard assignment to the current boundaries (exactly the fixed
      buckets at initialisation); the gradient is that of "relative".
    The same tau for every boundary keeps q decreasing in i, so every weight is >= 0.
    """

    def __init__(self, edges: list[int], max_positions: int, temperature: float,
                 assignment: BoundaryAssignment = "relative") -> None:
        super().__init__()
        if assignment not in ("relative", "absolute", "straight_through"):
            raise ValueError(f"unknown boundary assignment {assignment!r}")
        initial = (torch.tensor(edges, dtype=torch.float32) - 0.5) / max_positions  # [nb-1]
        self.boundaries = nn.Parameter(initial.clone())
        # gaps at initialisation: the diversity penalty measures how far boundaries have closed up
        self.register_buffer("initial_gaps", torch.diff(initial), persistent=False)
        # the fixed scheme's bucket index as a piecewise-linear function of u: knots at 0, the edges and 1
        knots = torch.tensor([0, *edges, max_positions], dtype=torch.float32) / max_positions  # [nb+1]
        self.register_buffer("knots", knots, persistent=False)
        self.max_positions = max_positions
        self.temperature = temperature
        self.assignment = assignment

    def bucket_coordinate(self, u: torch.Tensor) -> torch.Tensor:
        """The fixed scheme's continuous bucket index of u (extended linearly past the last knot)."""
        knots = self.knots.to(u.dtype)
        segment = torch.searchsorted(knots, u.detach().contiguous(), right=True).clamp(1, knots.numel() - 1)
        low, high = knots[segment - 1], knots[segment]
        return (segment - 1).to(u.dtype) + (u - low) / (high - low)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """Bucket weights for each position: [B, T] -> [B, T, nb], rows sum to 1."""
        b = torch.sort(self.boundaries).values
        u = positions.to(b.dtype).unsqueeze(-1) / self.max_positions  # [B, T, 1]
        if self.assignment == "absolute":
            q = torch.sigmoid((u - b) / self.temperature)  # [B, T, nb-1]
        else:
            q = torch.sigmoid((self.bucket_coordinate(u) - self.bucket_coordinate(b)) / self.temperature)
        soft = torch.cat([1 - q[..., :1], q[..., :-1] - q[..., 1:], q[..., -1:]], dim=-1)
        if self.assignment != "straight_through":
            return soft
        hard = F.one_hot(torch.bucketize(u.squeeze(-1), b.detach(), right=True), b.numel() + 1).to(soft.dtype)
        return hard + (soft - soft.detach())  # exactly `hard` forward, the soft gradient backward

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
        """Current boundaries as the first position of each bucket after the first, sorted (the fixed scheme's
        `bucket_edges` at initialisation)."""
        b = torch.sort(self.boundaries.detach().float()).values
        return (b * self.max_positions + 0.5).tolist()

    @classmethod
    def rebuild(cls, record: dict) -> LearnableBuckets:
        """The trained assignment from a `learned_boundaries` record: its edges, settings and exact boundary values
        (`boundaries_u`), so `rebuild(record).effective_buckets()` equals the recorded `effective_buckets`."""
        buckets = cls(record["initial"], record["max_positions"], record["temperature"], record["assignment"])
        with torch.no_grad():
            buckets.boundaries.copy_(torch.tensor(record["boundaries_u"], dtype=torch.float32))
        return buckets

    @torch.no_grad()
    def effective_buckets(self) -> int:
        """How many buckets hold the largest weight at some position in [0, max_positions): num_buckets for a
        hard assignment, fewer where a soft one smears narrow buckets together."""
        positions = torch.arange(self.max_positions, device=self.boundaries.device).unsqueeze(0)
        return effective_buckets(self(positions)[0])


def effective_buckets(weights: torch.Tensor) -> int:
    """Distinct buckets that hold the largest weight of at least one row of `weights` [positions, buckets]."""
    return int(torch.unique(weights.argmax(-1)).numel())
