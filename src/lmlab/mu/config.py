"""Configs of the MU semantic-block transformer and of its dense baseline (docs/mu.md sections 1-2)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lmlab.config import Section, build
from lmlab.errors import ConfigError

# docs/mu.md section 1: the 16 default blocks of the 8 x 8 grid with 2 x 2 blocks, row by row.
DEFAULT_BLOCK_NAMES = ("I", "S", "C1", "C2", "R1", "R2", "T", "K", "G", "M", "D", "F", "P", "E", "A", "X")

# Named presets (docs/mu.md section 1); `mu-simple` is the notes' simplification (fewer blocks, 8 layers).
PRESETS: dict[str, dict] = {
    "mu-sota": {"grid": 8, "block_shape": (2, 2), "n_layers": 12},
    "mu-simple": {"grid": 8, "block_shape": (2, 4), "n_layers": 8},
}


class MUConfig(Section):
    """The MU model: a `grid x grid` token state tiled by `block_shape` blocks (one attention head each).

    The state width is `grid**2` (64 by default). `block_names=None` means the 16 names of docs/mu.md when the
    grid has 16 blocks and `block0, block1, ...` otherwise.
    """

    vocab_size: int = Field(gt=0)
    max_seq_len: int = Field(gt=0)
    grid: int = Field(8, ge=1)
    block_shape: tuple[int, int] = (2, 2)
    block_names: tuple[str, ...] | None = None
    n_layers: int = Field(12, ge=1)
    cross_heads: int = Field(4, ge=1, description="heads of the cross-block attention over the whole state")
    ffn_mult: int = Field(4, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    affinity: Literal["low_rank", "hashed"] = "low_rank"
    affinity_rank: int = Field(8, ge=1, description="width r of the token-to-block affinity features")
    affinity_buckets: int = Field(1024, ge=1, description="hash table rows when affinity='hashed'")
    gate_hidden: int = Field(16, ge=1, description="hidden width of the gate's network over the state")
    tie_embeddings: bool = True

    @model_validator(mode="after")
    def _check_layout(self) -> MUConfig:
        bh, bw = self.block_shape
        if bh < 1 or bw < 1 or self.grid % bh or self.grid % bw:
            raise ValueError(
                f"grid {self.grid}x{self.grid} is not tiled by block_shape {bh}x{bw}: both block sides must be "
                f">= 1 and divide the grid (e.g. block_shape (2, 2) or (2, 4) for grid 8)"
            )
        if self.block_names is not None and len(self.block_names) != self.n_blocks:
            raise ValueError(
                f"block_names has {len(self.block_names)} names but grid {self.grid}x{self.grid} with block_shape "
                f"{bh}x{bw} has {self.n_blocks} blocks; give one name per block or leave block_names unset"
            )
        if self.d_model % self.cross_heads:
            raise ValueError(f"cross_heads {self.cross_heads} must divide the state width grid**2 = {self.d_model}")
        return self

    @classmethod
    def preset(cls, name: str, **overrides) -> MUConfig:
        """`MUConfig.preset("mu-sota" | "mu-simple", vocab_size=..., max_seq_len=..., **other_fields)`."""
        if name not in PRESETS:
            raise ConfigError(f"unknown MU preset '{name}'; choose one of {', '.join(PRESETS)}")
        return build(cls, {**PRESETS[name], **overrides}, where=f"MU preset {name}")

    @property
    def d_model(self) -> int:
        return self.grid * self.grid

    @property
    def block_dim(self) -> int:
        return self.block_shape[0] * self.block_shape[1]

    @property
    def n_blocks(self) -> int:
        return self.d_model // self.block_dim

    @property
    def names(self) -> tuple[str, ...]:
        if self.block_names is not None:
            return self.block_names
        if self.n_blocks == len(DEFAULT_BLOCK_NAMES):
            return DEFAULT_BLOCK_NAMES
        return tuple(f"block{i}" for i in range(self.n_blocks))

    def block_cells(self) -> list[list[int]]:
        """The index map: for each block (row by row over the block grid), its grid cells as row-major
        indices `row * grid + col`, themselves row by row inside the block."""
        bh, bw = self.block_shape
        cells = []
        for block_row in range(self.grid // bh):
            for block_col in range(self.grid // bw):
                cells.append(
                    [(block_row * bh + i) * self.grid + block_col * bw + j for i in range(bh) for j in range(bw)]
                )
        return cells


class DenseConfig(Section):
    """The dense baseline: a standard causal pre-norm GPT (learned positions, MHA, GELU 4x MLP)."""

    vocab_size: int = Field(gt=0)
    max_seq_len: int = Field(gt=0)
    n_layers: int = Field(ge=1)
    width: int = Field(ge=1)
    n_heads: int = Field(ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    tie_embeddings: bool = True

    @model_validator(mode="after")
    def _check_heads(self) -> DenseConfig:
        if self.width % self.n_heads:
            raise ValueError(f"width {self.width} must be a multiple of n_heads {self.n_heads}")
        return self
