"""BottleneckedGatedTranslator: source hidden states -> K soft tokens for the target (docs/latentwire.md section 1).

K learned queries at bottleneck width b read the source through `depth` pre-norm blocks of gated
self-attention, Flamingo-style gated cross-attention and a gated SwiGLU feed-forward. Every gate is a
scalar through tanh, initialised at 0, so at initialisation the queries pass through unchanged and the
soft tokens do not depend on the source: training opens the gates. The output is projected to the
target width and each soft token is rescaled to the median RMS of the target's input-embedding rows,
so the target sees vectors of the size it was trained on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError, model_validator
from torch import nn

from lmlab.config import Section, describe_validation_error
from lmlab.engine.optim import GroupRule
from lmlab.errors import ConfigError

GATE_PATTERN = r"gate_(sa|cross|ffn)$"
GATE_LR_SCALE = 3.0


class TranslatorShape(Section):
    """The size of a translator: K queries of width b, `depth` blocks, `heads` attention heads."""

    num_queries: int = Field(ge=1)
    bottleneck: int = Field(ge=1)
    depth: int = Field(ge=1)
    heads: int = Field(ge=1)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TranslatorShape:
        if self.bottleneck % self.heads:
            raise ValueError(f"bottleneck={self.bottleneck} must be divisible by heads={self.heads}")
        return self


# The notes' presets (K, b, depth, heads). Only the K=64 one names its heads (16); the others keep the
# same head width of 64.
PAPER_PRESETS = {
    64: TranslatorShape(num_queries=64, bottleneck=1024, depth=8, heads=16),
    48: TranslatorShape(num_queries=48, bottleneck=1024, depth=6, heads=16),
    32: TranslatorShape(num_queries=32, bottleneck=768, depth=4, heads=12),
}


def translator_preset(num_queries: int, *, bottleneck: int | None = None, depth: int | None = None,
                      heads: int | None = None) -> TranslatorShape:
    """The notes' preset for K in {32, 48, 64}; any field given overrides it (tiny translators give all)."""
    base = PAPER_PRESETS.get(num_queries)
    given = {k: v for k, v in {"bottleneck": bottleneck, "depth": depth, "heads": heads}.items() if v is not None}
    if base is None and len(given) < 3:
        raise ConfigError(f"no translator preset for num_queries={num_queries} (presets: {sorted(PAPER_PRESETS)}); "
                          "give bottleneck, depth and heads")
    return _shape((base.model_dump() if base is not None else {}) | given | {"num_queries": num_queries})


def _shape(fields: dict) -> TranslatorShape:
    try:
        return TranslatorShape(**fields)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, TranslatorShape, "translator")) from None


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Attention(nn.Module):
    """Multi-head attention of queries [B, K, b] over a context [B, T, c] (c = b for self-attention)."""

    def __init__(self, width: int, heads: int, context_width: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width, bias=False)
        self.kv_proj = nn.Linear(context_width, 2 * width, bias=False)
        self.o_proj = nn.Linear(width, width, bias=False)

    def forward(self, queries: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None):
        B, K, b = queries.shape
        q = self.q_proj(queries).view(B, K, self.heads, -1).transpose(1, 2)  # [B, h, K, b/h]
        k, v = self.kv_proj(context).view(B, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        mask = None if context_mask is None else context_mask.bool()[:, None, None, :]  # [B, 1, 1, T]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, h, K, b/h]
        return self.o_proj(out.transpose(1, 2).reshape(B, K, b))


class SwiGLU(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        inner = 8 * ((8 * width // 3 + 7) // 8)  # about 8b/3, rounded up to a multiple of 8
        # Not called "gate_*": the loop exempts every parameter named like a gate from weight decay.
        self.in_proj = nn.Linear(width, 2 * inner, bias=False)  # gate and up halves
        self.out_proj = nn.Linear(inner, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.in_proj(x).chunk(2, dim=-1)
        return self.out_proj(F.silu(gate) * up)


class TranslatorBlock(nn.Module):
    def __init__(self, width: int, heads: int, source_width: int):
        super().__init__()
        self.norm_sa = RMSNorm(width)
        self.self_attn = Attention(width, heads, width)
        self.norm_cross = RMSNorm(width)
        self.norm_source = RMSNorm(source_width)
        self.cross_attn = Attention(width, heads, source_width)
        self.norm_ffn = RMSNorm(width)
        self.ffn = SwiGLU(width)
        self.gate_sa = nn.Parameter(torch.zeros(()))
        self.gate_cross = nn.Parameter(torch.zeros(()))
        self.gate_ffn = nn.Parameter(torch.zeros(()))

    def forward(self, queries: torch.Tensor, source: torch.Tensor, source_mask: torch.Tensor) -> torch.Tensor:
        x = self.norm_sa(queries)
        queries = queries + torch.tanh(self.gate_sa) * self.self_attn(x, x)
        x = self.norm_cross(queries)
        queries = queries + torch.tanh(self.gate_cross) * self.cross_attn(x, self.norm_source(source), source_mask)
        return queries + torch.tanh(self.gate_ffn) * self.ffn(self.norm_ffn(queries))


class BottleneckedGatedTranslator(nn.Module):
    """forward(source_hidden [B, T, d_src], source_mask [B, T]) -> soft_tokens [B, K, d_tgt]."""

    def __init__(self, d_src: int, d_tgt: int, num_queries: int, bottleneck: int, depth: int, heads: int,
                 target_embed_rms: float):
        super().__init__()
        self.shape = _shape({"num_queries": num_queries, "bottleneck": bottleneck, "depth": depth, "heads": heads})
        self.queries = nn.Parameter(torch.empty(num_queries, bottleneck))  # [K, b]
        nn.init.orthogonal_(self.queries)  # as one K x b matrix: orthonormal rows when K <= b
        self.blocks = nn.ModuleList(TranslatorBlock(bottleneck, heads, d_src) for _ in range(depth))
        self.norm_out = RMSNorm(bottleneck)
        self.out_proj = nn.Linear(bottleneck, d_tgt, bias=False)
        self.register_buffer("target_embed_rms", torch.tensor(float(target_embed_rms)))

    @property
    def num_queries(self) -> int:
        return self.shape.num_queries

    def forward(self, source_hidden: torch.Tensor, source_mask: torch.Tensor) -> torch.Tensor:
        B = source_hidden.shape[0]
        source_hidden = source_hidden.to(self.queries.dtype)
        queries = self.queries.expand(B, -1, -1)  # [B, K, b]
        for block in self.blocks:
            queries = block(queries, source_hidden, source_mask)
        soft = self.out_proj(self.norm_out(queries)).float()  # [B, K, d_tgt]
        # Exact rescale (no clamp): eps only guards an all-zero row and is far below any real RMS.
        rms = soft.pow(2).mean(-1, keepdim=True).add(1e-20).sqrt()
        return (soft * (self.target_embed_rms / rms)).to(self.queries.dtype)


def optimizer_rules() -> list[GroupRule]:
    """Gates learn at 3x the base rate; gates, norms and biases get no weight decay."""
    return [
        GroupRule(GATE_PATTERN, lr_scale=GATE_LR_SCALE, weight_decay=0.0),
        GroupRule(r"(norm_\w+\.weight|bias)$", weight_decay=0.0),
    ]


@torch.no_grad()
def embedding_rms_median(model: nn.Module) -> float:
    """Median over vocabulary rows of the RMS of the model's input embeddings (the soft tokens' target size)."""
    weight = model.get_input_embeddings().weight.float()  # [V, d]
    return float(torch.quantile(weight.pow(2).mean(-1).sqrt(), 0.5))


def parameter_count(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters, counted from the module (build it on the meta device to count a large preset)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
