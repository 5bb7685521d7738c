"""MU model: causality, block attention against a per-block loop, the fixed block layout, the gate, configs."""

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from lmlab.config import build
from lmlab.errors import ConfigError
from lmlab.mu import DenseConfig, DenseModel, MUConfig, MUModel
from lmlab.mu.matching import model_parameter_counts

V, T = 64, 16


def tiny_mu(**overrides) -> MUConfig:
    return MUConfig(**{"vocab_size": V, "max_seq_len": T, "n_layers": 2, **overrides})


def rectangles(grid: int, bh: int, bw: int) -> list[tuple[slice, slice]]:
    """Each block's (rows, cols) on the grid, row by row - written independently of config.block_cells()."""
    return [
        (slice(r, r + bh), slice(c, c + bw)) for r in range(0, grid, bh) for c in range(0, grid, bw)
    ]


def randomise(model: torch.nn.Module) -> None:
    """Perturb every 1-d parameter (biases, norms, gate bases) so every term of the forward pass is exercised."""
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.3 * torch.randn_like(param))


CAUSAL_MODELS = {
    "mu-sota-low-rank": lambda: MUModel(MUConfig.preset("mu-sota", vocab_size=V, max_seq_len=T, n_layers=2)),
    "mu-sota-hashed": lambda: MUModel(
        MUConfig.preset("mu-sota", vocab_size=V, max_seq_len=T, n_layers=2, affinity="hashed", affinity_buckets=16)
    ),
    "mu-simple": lambda: MUModel(MUConfig.preset("mu-simple", vocab_size=V, max_seq_len=T, n_layers=2)),
    "mu-simple-6x6-hashed": lambda: MUModel(
        tiny_mu(grid=6, block_shape=(3, 2), cross_heads=4, affinity="hashed", affinity_buckets=8)
    ),
    "dense": lambda: DenseModel(DenseConfig(vocab_size=V, max_seq_len=T, n_layers=2, width=64, n_heads=4)),
}


@pytest.mark.parametrize("name", CAUSAL_MODELS)
def test_changing_token_t_leaves_earlier_logits_unchanged(name):
    torch.manual_seed(0)
    model = CAUSAL_MODELS[name]().eval()
    randomise(model)
    ids = torch.randint(0, V, (2, T))
    for t in (0, 5, T - 1):
        changed = ids.clone()
        changed[:, t] = (ids[:, t] + 1 + torch.arange(2)) % V
        with torch.no_grad():
            before, after = model(ids), model(changed)
        assert before.shape == (2, T, V)
        torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
        # ...while the changed position itself does see the new token.
        assert (after[:, t] - before[:, t]).abs().amax() > 1e-4


def test_batched_block_attention_equals_per_block_loop():
    torch.manual_seed(0)
    model = MUModel(tiny_mu())
    randomise(model)
    attn = model.layers[1].block_attn
    grid = torch.randn(2, 10, 8, 8)  # [B, T, g, g]
    with torch.no_grad():
        batched = model.grid_view(attn(model.state_from_grid(grid)))
        expected = torch.zeros_like(grid)
        causal = torch.ones(10, 10, dtype=torch.bool).tril()
        for b, (rows, cols) in enumerate(rectangles(8, 2, 2)):
            cells = grid[:, :, rows, cols].reshape(2, 10, 4)  # this block's cells, row by row
            q, k, v = (cells @ attn.qkv.weight[b] + attn.qkv.bias[b]).split(4, dim=-1)
            scores = (q @ k.transpose(1, 2) / 2.0).masked_fill(~causal, float("-inf"))  # 1/sqrt(head_dim 4)
            out = scores.softmax(-1) @ v @ attn.proj.weight[b] + attn.proj.bias[b]
            expected[:, :, rows, cols] = out.reshape(2, 10, 2, 2)
    torch.testing.assert_close(batched, expected, rtol=1e-5, atol=1e-5)


def test_block_cells_match_the_named_grid_rectangles():
    config = tiny_mu()
    cells = dict(zip(config.names, config.block_cells(), strict=True))
    assert config.names[:4] == ("I", "S", "C1", "C2") and config.names[-1] == "X"
    assert cells["I"] == [0, 1, 8, 9]
    assert cells["C2"] == [6, 7, 14, 15]
    assert cells["G"] == [32, 33, 40, 41]
    assert cells["X"] == [54, 55, 62, 63]
    assert sorted(c for block in cells.values() for c in block) == list(range(64))


@pytest.mark.parametrize("block_shape", [(2, 2), (2, 4)])
def test_a_block_covers_the_same_cells_in_every_layer(block_shape):
    torch.manual_seed(0)
    model = MUModel(tiny_mu(block_shape=block_shape, n_layers=3)).eval()
    randomise(model)
    grid = torch.randn(1, 6, 8, 8)
    for layer in model.layers:
        reference = model.grid_view(layer.block_attn(model.state_from_grid(grid)))
        for rows, cols in rectangles(8, *block_shape):
            perturbed = grid.clone()
            perturbed[:, :, rows, cols] += torch.randn_like(perturbed[:, :, rows, cols])
            moved = (model.grid_view(layer.block_attn(model.state_from_grid(perturbed))) - reference).abs()
            expected = torch.zeros(8, 8, dtype=torch.bool)
            expected[rows, cols] = True
            assert torch.equal(moved.amax(dim=(0, 1)) > 1e-7, expected)


def test_a_closed_gate_keeps_its_block_and_only_its_block_unchanged():
    torch.manual_seed(0)
    model = MUModel(tiny_mu()).eval()
    randomise(model)
    config = model.config
    ids = torch.randint(0, V, (2, T))
    state = model.tok_emb(ids) + model.pos_emb(torch.arange(T))
    features = model.affinity(ids)
    for layer in model.layers:
        for b, (rows, cols) in enumerate(rectangles(8, 2, 2)):
            with torch.no_grad():
                saved = layer.gate.base[b].item()
                layer.gate.base[b] = -1e4  # sigmoid -> exactly 0
                moved = (model.grid_view(layer(state, features)) - model.grid_view(state)).abs().amax(dim=(0, 1))
                layer.gate.base[b] = saved
            closed = torch.zeros(8, 8, dtype=torch.bool)
            closed[rows, cols] = True
            assert moved[closed].max() == 0.0, config.names[b]
            assert moved[~closed].min() > 0.0, config.names[b]


def test_gate_is_per_token_sensitivity_between_zero_and_one():
    torch.manual_seed(0)
    model = MUModel(tiny_mu(affinity="hashed", affinity_buckets=32)).eval()
    randomise(model)
    ids = torch.randint(0, V, (3, T))
    layer = model.layers[0]
    state = layer.ln_block(model.tok_emb(ids) + model.pos_emb(torch.arange(T)))
    gates = layer.gate(state, model.affinity(ids))
    assert gates.shape == (3, T, 16)
    assert ((gates > 0) & (gates < 1)).all()
    # Same affinity bucket arithmetic as documented: ((A * id + B) mod P) mod buckets.
    expected = model.affinity.table.weight[(ids * 1_000_003 + 12_345) % 2_147_483_647 % 32]
    torch.testing.assert_close(model.affinity(ids), expected)
    logits = torch.sigmoid(layer.gate.base + layer.gate.affinity(expected) + layer.gate.net(state))
    torch.testing.assert_close(gates, logits)


def test_every_parameter_receives_gradient():
    torch.manual_seed(0)
    model = MUModel(tiny_mu(tie_embeddings=False, dropout=0.1))
    ids = torch.randint(0, V, (2, T))
    F.cross_entropy(model(ids)[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1)).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_affinity_table_is_a_small_share_of_the_parameters():
    # The original's per-layer [V, n_blocks] tables were 57% of a GPT-2-vocabulary model.
    for affinity in ("low_rank", "hashed"):
        config = MUConfig.preset("mu-sota", vocab_size=50257, max_seq_len=192, affinity=affinity)
        total = model_parameter_counts(config)["total"]
        rows = 50257 if affinity == "low_rank" else config.affinity_buckets
        assert rows * config.affinity_rank / total < 0.10


def test_tied_head_shares_the_token_embedding():
    tied, untied = MUModel(tiny_mu()), MUModel(tiny_mu(tie_embeddings=False))
    assert tied.head.weight is tied.tok_emb.weight
    assert untied.head.weight is not untied.tok_emb.weight


def test_presets():
    sota = MUConfig.preset("mu-sota", vocab_size=V, max_seq_len=T)
    assert (sota.grid, sota.block_shape, sota.n_layers, sota.n_blocks) == (8, (2, 2), 12, 16)
    assert sota.names == ("I", "S", "C1", "C2", "R1", "R2", "T", "K", "G", "M", "D", "F", "P", "E", "A", "X")
    simple = MUConfig.preset("mu-simple", vocab_size=V, max_seq_len=T)
    assert simple.n_layers == 8 and simple.n_blocks < sota.n_blocks
    assert len(simple.names) == simple.n_blocks
    with pytest.raises(ConfigError, match="mu-sota"):
        MUConfig.preset("mu-large", vocab_size=V, max_seq_len=T)
    with pytest.raises(ConfigError, match="n_layers"):
        MUConfig.preset("mu-sota", vocab_size=V, max_seq_len=T, n_layers=0)


def test_grid_not_tiled_by_block_shape_is_a_config_error():
    data = {"vocab_size": V, "max_seq_len": T, "grid": 6, "block_shape": [4, 4]}
    with pytest.raises(ConfigError, match=r"grid 6x6 is not tiled by block_shape 4x4"):
        build(MUConfig, data)
    with pytest.raises(ValidationError, match=r"grid 6x6 is not tiled by block_shape 4x4"):
        MUConfig(**data)
    assert build(MUConfig, {**data, "block_shape": [3, 2]}).n_blocks == 6


def test_block_names_must_name_every_block():
    with pytest.raises(ConfigError, match="block_names has 2 names but .* has 16 blocks"):
        build(MUConfig, {"vocab_size": V, "max_seq_len": T, "block_names": ["a", "b"]})
    config = tiny_mu(block_shape=(4, 4), block_names=("who", "what", "where", "when"))
    assert config.names == ("who", "what", "where", "when")


def test_input_longer_than_context_is_rejected():
    with pytest.raises(ValueError, match="max_seq_len is 16"):
        MUModel(tiny_mu())(torch.zeros(1, T + 1, dtype=torch.long))
