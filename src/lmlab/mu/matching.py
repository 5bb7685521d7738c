"""Parameter counting and the dense-baseline width solver (docs/mu.md section 2)."""

from __future__ import annotations

from functools import cache
from typing import Literal

import torch
from torch import nn

from lmlab.errors import ConfigError
from lmlab.mu.config import DenseConfig, MUConfig
from lmlab.mu.dense import DenseModel
from lmlab.mu.model import MUModel

TOLERANCE = 0.02  # docs/mu.md: the baseline matches MU's parameter count within 2%

Count = Literal["total", "non_embedding"]


def count_parameters(model: nn.Module) -> dict[str, int]:
    """{"total", "non_embedding"} parameter counts of an MUModel or DenseModel.

    `total` counts every parameter once (a tied head shares the token embedding and is not counted again).
    `non_embedding` excludes exactly: the token embedding table (`tok_emb`), the position embedding table
    (`pos_emb`) and, when it is not tied, the output head (`head`). Everything else is counted, including
    MU's token-to-block affinity table: it is part of MU's gating, not of the token representation, and
    counting it gives the dense baseline the larger budget.
    """
    params = {id(p): p.numel() for p in model.parameters()}
    embedding = {id(p) for p in (model.tok_emb.weight, model.pos_emb.weight, model.head.weight)}
    total = sum(params.values())
    return {"total": total, "non_embedding": total - sum(params[i] for i in embedding)}


def model_parameter_counts(config: MUConfig | DenseConfig) -> dict[str, int]:
    """count_parameters of the model a config describes, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = MUModel(config) if isinstance(config, MUConfig) else DenseModel(config)
    return count_parameters(model)


def match_dense(
    mu_config: MUConfig,
    count: Count = "total",
    tie_embeddings: bool | None = None,
    n_heads: int | None = None,
    tolerance: float = TOLERANCE,
) -> DenseConfig:
    """The dense baseline whose parameter count (`count`: "total" or "non_embedding", see `count_parameters`)
    matches MU's within `tolerance` (2%): same vocabulary, context, depth and dropout; `tie_embeddings=None` = as MU.

    The width is a multiple of the head count. `n_heads` (default: MU's cross-attention heads) is tried
    first; when no multiple of it lands within the tolerance (small widths move the count in coarse steps), the
    nearest head counts are tried in turn (n-1, n+1, n-2, ...), staying comparable to MU's: from half to twice
    `n_heads`, never a single head standing in for several. Raises ConfigError naming the closest match when no
    width and head count in that range is within the tolerance.
    """
    if count not in ("total", "non_embedding"):
        raise ConfigError(f"count must be 'total' or 'non_embedding', got {count!r}")
    tie = mu_config.tie_embeddings if tie_embeddings is None else tie_embeddings
    preferred_heads = n_heads or mu_config.cross_heads
    target = model_parameter_counts(mu_config)[count]

    def dense_config(width: int, heads: int) -> DenseConfig:
        return DenseConfig(
            vocab_size=mu_config.vocab_size, max_seq_len=mu_config.max_seq_len, n_layers=mu_config.n_layers,
            width=width, n_heads=heads, dropout=mu_config.dropout, tie_embeddings=tie,
        )

    @cache
    def params_at(width: int) -> int:  # the count does not depend on the head count
        return model_parameter_counts(dense_config(width, 1))[count]

    # Smallest width whose count reaches the target (the count grows strictly with width).
    high = 1
    while params_at(high) < target:
        high *= 2
    low = high // 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if params_at(mid) < target else (low, mid)

    best = None
    heads_tried = _head_counts_near(preferred_heads)
    for heads in heads_tried:
        above = -(-high // heads) * heads
        candidates = [w for w in (above - heads, above) if w >= heads]
        width = min(candidates, key=lambda w: abs(params_at(w) - target))
        error = abs(params_at(width) - target) / target
        if best is None or error < best[0]:
            best = (error, width, heads)
        if error <= tolerance:
            return dense_config(width, heads)
    raise ConfigError(
        f"no dense width with {min(heads_tried)}-{max(heads_tried)} heads (MU has {preferred_heads}) matches MU's "
        f"{count} parameter count {target:,} within {tolerance:.0%} (closest: width {best[1]} with {best[2]} heads, "
        f"{params_at(best[1]):,} parameters, off by {best[0]:.1%}); set match.tolerance={best[0] + 0.005:.3f} to "
        f"accept it, or change grid or n_layers"
    )


def _head_counts_near(n_heads: int) -> list[int]:
    """n, n-1, n+1, n-2, n+2, ... within [ceil(n/2), 2n]: head counts comparable to n."""
    low = max(1, -(-n_heads // 2))
    order = [n_heads]
    for step in range(1, n_heads + 1):
        order += [h for h in (n_heads - step, n_heads + step) if low <= h <= 2 * n_heads]
    return order
