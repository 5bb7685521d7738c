"""MU: the semantic-block transformer (docs/mu.md section 1).

Each token's state is a `g x g` grid of numbers tiled by `bh x bw` semantic blocks. A layer runs, pre-norm
and causal: block-wise attention (each block is one attention head over its own cells), cross-block
attention over the whole state, a GELU feed-forward, and a per-token, per-block sensitivity gate that
scales the layer's update of each block: `M_t <- M_t + s_t (.) (H_t - M_t)`.

Layout: the state vector is stored *block-major* - block b holds the slice `[b*bh*bw, (b+1)*bh*bw)` - so
a block is a reshape, not a gather, in every layer. Where each block sits on the grid is the fixed
index map `config.block_cells()` (block -> row-major grid cells), computed once; `grid_view` and
`state_from_grid` convert between the two layouts. Since the embedding is learned, storing the grid in
another order changes nothing but speed.
"""

from __future__ import annotations

import torch
from torch import nn

from lmlab.kernels import causal_attention
from lmlab.mu.config import MUConfig
from lmlab.mu.dense import MLP, CausalSelfAttention, LayerStack, init_weights, positions

# Universal hashing of token ids into the affinity table: ((A * id + B) mod P) mod buckets, P prime.
_HASH_A, _HASH_B, _HASH_P = 1_000_003, 12_345, 2_147_483_647


class BlockLinear(nn.Module):
    """One independent linear map per block: [..., n_blocks, d_in] -> [..., n_blocks, d_out]."""

    def __init__(self, n_blocks: int, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_blocks, d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(n_blocks, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...ni,nio->...no", x, self.weight) + self.bias


class BlockAttention(nn.Module):
    """Each block's cells attend across the sequence on their own: one causal head per block, all blocks
    in one batched attention call (`lmlab.kernels.causal_attention`: a compiled kernel on CPU, SDPA elsewhere)."""

    def __init__(self, n_blocks: int, block_dim: int, dropout: float):
        super().__init__()
        self.n_blocks, self.block_dim, self.dropout = n_blocks, block_dim, dropout
        self.qkv = BlockLinear(n_blocks, block_dim, 3 * block_dim)
        self.proj = BlockLinear(n_blocks, block_dim, block_dim)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x.view(B, T, self.n_blocks, self.block_dim))  # [B, T, nb, 3*db]
        y = causal_attention(qkv, self.n_blocks, self.block_dim, self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y).reshape(B, T, C))  # y: [B, T, nb, db]


class TokenBlockAffinity(nn.Module):
    """Per-token affinity features [B, T, r], shared by all layers (each layer maps them to its blocks).

    `low_rank`: a [V, r] table (the original's per-layer [V, n_blocks] tables were 57% of the model);
    `hashed`: token ids hashed into a [buckets, r] table, for large vocabularies.
    """

    def __init__(self, config: MUConfig):
        super().__init__()
        self.hashed = config.affinity == "hashed"
        rows = config.affinity_buckets if self.hashed else config.vocab_size
        self.table = nn.Embedding(rows, config.affinity_rank)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.hashed:
            input_ids = (input_ids * _HASH_A + _HASH_B) % _HASH_P % self.table.num_embeddings
        return self.table(input_ids)


class BlockGate(nn.Module):
    """Dynamic block sensitivity s_t in (0, 1)^{n_blocks}: sigmoid(per-block base + token affinity + a small
    network over the token's current state)."""

    def __init__(self, config: MUConfig):
        super().__init__()
        self.base = nn.Parameter(torch.zeros(config.n_blocks))  # every block starts half open (s = 0.5)
        self.affinity = nn.Linear(config.affinity_rank, config.n_blocks, bias=False)
        self.net = nn.Sequential(
            nn.Linear(config.d_model, config.gate_hidden), nn.GELU(), nn.Linear(config.gate_hidden, config.n_blocks)
        )

    def forward(self, state: torch.Tensor, affinity_features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.base + self.affinity(affinity_features) + self.net(state))  # [B, T, nb]


class MULayer(nn.Module):
    def __init__(self, config: MUConfig):
        super().__init__()
        d = config.d_model
        self.n_blocks, self.block_dim = config.n_blocks, config.block_dim
        self.ln_block = nn.LayerNorm(d)
        self.block_attn = BlockAttention(config.n_blocks, config.block_dim, config.dropout)
        self.ln_cross = nn.LayerNorm(d)
        self.cross_attn = CausalSelfAttention(d, config.cross_heads, config.dropout)
        self.ln_ffn = nn.LayerNorm(d)
        self.ffn = MLP(d, config.ffn_mult, config.dropout)
        self.gate = BlockGate(config)

    def forward(self, state: torch.Tensor, affinity_features: torch.Tensor) -> torch.Tensor:
        B, T, C = state.shape
        normed = self.ln_block(state)
        h = state + self.block_attn(normed)
        h = h + self.cross_attn(self.ln_cross(h))
        h = h + self.ffn(self.ln_ffn(h))
        s = self.gate(normed, affinity_features)  # [B, T, nb]
        # M + s (.) (H - M) with one gate value per block (a block is a contiguous slice of the state).
        blocks = (B, T, self.n_blocks, self.block_dim)
        return torch.lerp(state.view(blocks), h.view(blocks), s.unsqueeze(-1)).view(B, T, C)


class MUModel(LayerStack):
    """`model(input_ids [B, T]) -> logits [B, T, V]`."""

    def __init__(self, config: MUConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.tok_emb = nn.Embedding(config.vocab_size, d)
        self.pos_emb = nn.Embedding(config.max_seq_len, d)
        self.drop = nn.Dropout(config.dropout)
        self.affinity = TokenBlockAffinity(config)
        self.layers = nn.ModuleList(MULayer(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        # state index -> grid cell (block-major order of config.block_cells()), and its inverse.
        state_cells = torch.tensor(config.block_cells()).flatten()
        self.register_buffer("state_cells", state_cells, persistent=False)
        self.register_buffer("cell_states", torch.argsort(state_cells), persistent=False)
        init_weights(self, residual_branches=3 * config.n_layers)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = positions(input_ids, self.config.max_seq_len)
        state = self.drop(self.tok_emb(input_ids) + self.pos_emb(pos))  # [B, T, g*g], block-major
        features = self.affinity(input_ids)  # [B, T, r]
        for layer in self.layers:
            state = self.run_layer(layer, state, features)
        return self.head(self.ln_f(state))

    def grid_view(self, state: torch.Tensor) -> torch.Tensor:
        """A state [..., g*g] in the model's block-major layout -> the grid [..., g, g]."""
        g = self.config.grid
        return state[..., self.cell_states].unflatten(-1, (g, g))

    def state_from_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """The grid [..., g, g] -> a state [..., g*g] in the model's block-major layout."""
        return grid.flatten(-2)[..., self.state_cells]
