"""HyLoRADA inside tiny GPT-2 (Conv1D) and Llama (Linear, RoPE) models: init, training, causality, padding,
cached generation, positions and buckets, component bookkeeping.

The tiny-model builders here are shared by the other test_hylorada_* files.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from lmlab.engine.optim import param_groups
from lmlab.hylorada import (
    HyLoRADAConfig,
    HyLoRADALinear,
    apply_hylorada,
    auxiliary_loss,
    boundary_parameters,
    component_param_counts,
    drop_frozen_boundary_grads,
    learned_boundaries,
    optimizer_rules,
)
from lmlab.hylorada.layers import keep_mask
from lmlab.hylorada.model import hylorada_state
from lmlab.hylorada.position import LearnableBuckets, PositionContext, bucket_edges, bucketize, token_positions

VOCAB = 128
CONTEXT = 64
DESIGNS = ["none", "original", "position_adaptive", "per_layer", "learnable_bucket", "constant"]


def tiny_gpt2(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    """2 layers, width 64, GPT-2 Conv1D layers. Weights N(0, 0.1) so logits are O(1), not near-uniform."""
    torch.manual_seed(seed)
    options = dict(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=64, n_layer=2, n_head=4, bos_token_id=1,
                   eos_token_id=2, initializer_range=0.1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config = GPT2Config(**(options | overrides))
    return GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """2 layers, width 64, grouped-query attention, RoPE, untied head."""
    torch.manual_seed(seed)
    options = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=CONTEXT, bos_token_id=1, eos_token_id=2,
                   pad_token_id=0, initializer_range=0.1)
    config = LlamaConfig(**(options | overrides))
    return LlamaForCausalLM(config).eval()


BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def hy_config(**overrides) -> HyLoRADAConfig:
    """Small sizes for tiny models; no dropout so outputs are deterministic unless a test asks for it."""
    base = dict(r=4, alpha=8, dropout=0.0, num_landmarks=4, num_buckets=8)
    return HyLoRADAConfig(**(base | overrides))


@torch.no_grad()
def perturb(model, seed: int = 1, std: float = 0.2) -> None:
    """Move every HyLoRADA parameter off its initial value (B = 0 and gates = 0 would hide most paths)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_" in name or "position_gate" in name or "hylorada." in name:
            param.add_(torch.randn(param.shape, generator=gen) * std)


def token_batch(batch: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def lm_logits(model, ids, mask=None, position_ids=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits


# ---------------------------------------------------------------------------------------------------
# Init and training


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_at_init_logits_equal_base_exactly(arch, variant):
    ids = token_batch()
    reference = lm_logits(BUILDERS[arch](), ids)
    config = hy_config(use_rslora=variant != "lora", use_dora=variant == "dora", position_bias=True, landmarks="none")
    model = apply_hylorada(BUILDERS[arch](), config)
    assert torch.equal(lm_logits(model, ids), reference)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("design", ["position_adaptive", "learnable_bucket", "original", "per_layer", "constant"])
def test_at_init_landmarks_are_the_only_difference_from_the_base(arch, design):
    """What the README says of init: LoRA / DoRA / position bias are exact, landmarks add scale * g L from the start
    (scale 0.1), a small change; with every landmark scale at 0 the model is its base bit for bit."""
    from lmlab.hylorada import landmark_modules, position_components_removed

    ids = token_batch()
    reference = lm_logits(BUILDERS[arch](), ids)
    model = apply_hylorada(BUILDERS[arch](), hy_config(use_dora=True, position_bias=True, landmarks=design))
    assert all(float(m.scale) == pytest.approx(0.1) for m in landmark_modules(model))
    change = (lm_logits(model, ids) - reference).abs().max().item()
    assert 0 < change < (0.1 if design == "per_layer" else 0.01)
    with position_components_removed(model):
        assert torch.equal(lm_logits(model, ids), reference)


def expected_trainable(design: str) -> set[str]:
    """Every kind of trainable tensor the config below must have, by name suffix."""
    names = {"lora_A", "lora_B", "lora_magnitude", "position_gate", "hylorada.position_bias.table",
             "wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"}
    if design in ("position_adaptive", "learnable_bucket"):
        names |= {"hylorada.landmarks.vectors", "hylorada.landmarks.position_logits",
                  "hylorada.landmarks.content.weight", "hylorada.landmarks.scale"}
    if design == "learnable_bucket":
        names.add("hylorada.landmarks.buckets.boundaries")
    if design in ("original", "original_leaky"):
        names |= {"hylorada.landmarks.vectors", "hylorada.landmarks.gate.weight", "hylorada.landmarks.scale"}
    if design == "constant":
        names |= {"hylorada.landmarks.vectors", "hylorada.landmarks.logits", "hylorada.landmarks.scale"}
    if design == "per_layer":
        names |= {f"hylorada.layer_landmarks.{i}.{p}" for i in (0, 1) for p in ("vectors", "gate.weight", "scale")}
    return names


@pytest.mark.parametrize("design", ["position_adaptive", "learnable_bucket", "original", "per_layer", "constant",
                                    "original_leaky"])
def test_three_adamw_steps_change_every_trainable_tensor(design):
    config = hy_config(use_dora=True, position_bias=True, landmarks=design, dropout=0.05,
                       train_embeddings=True, train_norms=True)
    model = apply_hylorada(tiny_gpt2(), config)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for suffix in expected_trainable(design):
        assert any(n.endswith(suffix) for n in trainable), f"no trainable tensor named *{suffix}"
    if design == "learnable_bucket":
        assert any(p is boundary_parameters(model)[0] for p in model.parameters())
    before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.0)
    model.train()
    ids = token_batch(4, 24)
    for _ in range(3):  # B moves at step 1, the bias table at step 2 (needs B != 0), the gates at step 3
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    unchanged = [n for n, p in trainable.items() if torch.equal(p.detach(), before[n])]
    assert unchanged == []


def test_base_is_frozen_and_untouched_by_training():
    model = apply_hylorada(tiny_llama(), hy_config())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert all(".base_layer." in n or "hylorada" not in n for n in frozen)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = token_batch()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert all(torch.equal(p.detach(), frozen[n]) for n, p in model.named_parameters() if n in frozen)


# ---------------------------------------------------------------------------------------------------
# Causality, left padding, cached generation


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("design", DESIGNS)
def test_changing_a_token_leaves_earlier_logits_unchanged(arch, design):
    model = apply_hylorada(BUILDERS[arch](), hy_config(position_bias=True, landmarks=design))
    perturb(model)
    ids = token_batch(2, 20)
    changed = ids.clone()
    t = 11
    changed[:, t] = (changed[:, t] + 7) % VOCAB
    before, after = lm_logits(model, ids), lm_logits(model, changed)
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
    assert (after[:, t:] - before[:, t:]).abs().max() > 1e-3  # the change is visible from t on


def left_padded(sequences: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = seq
        mask[row, width - len(seq):] = 1
    return ids, mask


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp_min(0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("design", DESIGNS)
def test_left_padded_batch_gives_unpadded_logits(arch, design):
    model = apply_hylorada(BUILDERS[arch](), hy_config(position_bias=True, landmarks=design))
    perturb(model)
    sequences = [token_batch(1, 14, seed=1)[0], token_batch(1, 9, seed=2)[0]]
    ids, mask = left_padded(sequences)
    # GPT-2 reads absolute positions from position_ids only; Llama gets the mask alone, so HyLoRADA
    # must count positions from the mask itself
    position_ids = mask_positions(mask) if arch == "gpt2" else None
    padded = lm_logits(model, ids, mask, position_ids)
    for row, seq in enumerate(sequences):
        alone = lm_logits(model, seq[None])[0]
        torch.testing.assert_close(padded[row, -len(seq):], alone, rtol=0, atol=1e-5)


@torch.no_grad()
def greedy_cached(model, ids, mask, steps: int, pass_positions: bool, cache_name: str = "past_key_values"
                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Token-by-token greedy decoding with the KV cache, passed back under `cache_name` (transformers 5.25 names it
    `cache` and still accepts `past_key_values`) and read from the output under either name."""
    position_ids = mask_positions(mask) if pass_positions else None
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True)
    tokens, logits = [], []
    for _ in range(steps):
        logits.append(out.logits[:, -1])
        token = out.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
        tokens.append(token)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        position_ids = mask_positions(mask)[:, -1:] if pass_positions else None
        past = out.get("cache", out.get("past_key_values"))
        out = model(input_ids=token, attention_mask=mask, position_ids=position_ids, use_cache=True,
                    **{cache_name: past})
    return torch.cat(tokens, 1), logits


@torch.no_grad()
def greedy_recomputed(model, ids, mask, steps: int, pass_positions: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The same decoding re-running the whole sequence at every step (no cache)."""
    tokens, logits = [], []
    for _ in range(steps):
        position_ids = mask_positions(mask) if pass_positions else None
        last = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits[:, -1]
        logits.append(last)
        token = last.argmax(-1, keepdim=True)
        tokens.append(token)
        ids = torch.cat([ids, token], 1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    return torch.cat(tokens, 1), logits


CACHE_NAMES = ["past_key_values"] + (["cache"] if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters
                                     else [])


@pytest.mark.parametrize("cache_name", CACHE_NAMES)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("design", DESIGNS)
def test_cached_greedy_generation_equals_recomputation(arch, design, cache_name):
    """Positions, buckets and pooled landmarks continue from the cache under either of its names (with `cache=`
    the positions once restarted at 0 on every step: logits 0.013 off)."""
    model = apply_hylorada(BUILDERS[arch](), hy_config(position_bias=True, landmarks=design))
    perturb(model)
    ids, mask = left_padded([token_batch(1, 10, seed=3)[0], token_batch(1, 6, seed=4)[0]])
    pass_positions = arch == "gpt2"
    cached, cached_logits = greedy_cached(model, ids, mask, 8, pass_positions, cache_name)
    recomputed, recomputed_logits = greedy_recomputed(model, ids, mask, 8, pass_positions)
    assert torch.equal(cached, recomputed)
    for a, b in zip(cached_logits, recomputed_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_pooled_landmarks_refuse_a_cache_they_did_not_fill():
    model = apply_hylorada(tiny_llama(), hy_config(landmarks="original"))
    plain = tiny_llama()
    ids = token_batch(1, 6)
    past = plain(input_ids=ids, use_cache=True).past_key_values
    with pytest.raises(RuntimeError, match="pool over all earlier tokens"):
        model(input_ids=ids[:, -1:], past_key_values=past, use_cache=True)


# ---------------------------------------------------------------------------------------------------
# Position context and buckets


def test_token_positions_count_real_tokens_and_continue_from_the_cache():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert token_positions(2, 5, attention_mask=mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    # decoding one token: the mask covers past + new token
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    assert token_positions(2, 1, attention_mask=step_mask).tolist() == [[3], [5]]
    assert token_positions(2, 2, past_length=7).tolist() == [[7, 8], [7, 8]]
    explicit = torch.tensor([[4, 5]])
    assert token_positions(2, 2, attention_mask=mask, position_ids=explicit).tolist() == [[4, 5], [4, 5]]


def test_model_computes_positions_once_per_forward_for_all_modules():
    model = apply_hylorada(tiny_llama(), hy_config(position_bias=True, landmarks="position_adaptive"))
    state = hylorada_state(model)
    adapters = [m for m in model.modules() if isinstance(m, HyLoRADALinear)]
    assert adapters and all(a.context is state.context for a in adapters)
    assert state.landmarks.context is state.context
    calls = []
    original = state.context.position_bias_term
    state.context.position_bias_term = lambda n: calls.append(n) or original(n)
    ids, mask = left_padded([token_batch(1, 7)[0], token_batch(1, 4)[0]])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert state.context.positions.tolist() == mask_positions(mask).tolist()
    assert state.context.buckets.tolist() == bucketize(mask_positions(mask), state.bucket_edges).tolist()
    assert len(calls) == len(adapters)  # every adapter read the one shared term
    with pytest.raises(RuntimeError, match="call the model returned by apply_hylorada"):
        model.model(input_ids=token_batch(1, 5))  # a submodule alone has no fresh positions


def test_log_buckets_are_exact_first_then_geometric():
    edges = bucket_edges(32, 1024, "log")
    assert len(edges) == 31 and edges[0] == 1
    assert all(b > a for a, b in zip(edges, edges[1:], strict=False))
    assert edges[:4] == [1, 2, 3, 4]  # geometric steps below one position become exact buckets
    geometric = [round(1024 ** (k / 32)) for k in range(1, 32)]
    assert edges[-10:] == geometric[-10:]  # the wide late buckets follow 1024^(k/32)
    assert edges[-1] < 1024


def test_uniform_buckets_have_equal_widths_and_overflow_goes_last():
    edges = bucket_edges(8, 64, "uniform")
    assert edges == [8, 16, 24, 32, 40, 48, 56]
    positions = torch.tensor([0, 7, 8, 63, 64, 5000])
    expected = [sum(e <= p for e in edges) for p in positions.tolist()]  # brute force: edges at or below p
    assert bucketize(positions, torch.tensor(edges)).tolist() == expected == [0, 0, 1, 7, 7, 7]


def test_learnable_buckets_match_fixed_buckets_at_low_temperature_and_get_gradients():
    edges = bucket_edges(8, 64, "log")
    buckets = LearnableBuckets(edges, 64, temperature=1e-4)
    positions = torch.arange(0, 80).view(2, 40)
    weights = buckets(positions)  # [2, 40, 8]
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 40))
    # edges sit exactly on integer positions (q = 0.5 there); compare away from them
    off_edge = ~torch.isin(positions, torch.tensor(edges))
    hard = bucketize(positions, torch.tensor(edges))
    assert torch.equal(weights.argmax(-1)[off_edge], hard[off_edge])
    soft = LearnableBuckets(edges, 64, temperature=0.1)
    (soft(positions) * torch.arange(8.0)).sum().backward()
    assert soft.boundaries.grad is not None and soft.boundaries.grad.abs().min() > 0


# ---------------------------------------------------------------------------------------------------
# Adapter layer details


def test_dropout_touches_only_the_lora_input_and_is_absent_at_zero():
    base = torch.nn.Linear(32, 48)
    layer = HyLoRADALinear(base, hy_config(dropout=0.5, position_bias=False)).train()
    x = torch.randn(4, 32)
    # B = 0: whatever dropout does to the LoRA input, the output is exactly the base output
    assert torch.equal(layer(x), base(x))
    no_dropout = apply_hylorada(tiny_gpt2(), hy_config(dropout=0.0, landmarks="position_adaptive"))
    hylorada_modules = [m for n, m in no_dropout.named_modules() if isinstance(m, HyLoRADALinear) or "hylorada" in n]
    assert not any(isinstance(sub, torch.nn.Dropout) for m in hylorada_modules for sub in m.modules())


def test_keep_mask_keeps_each_element_with_probability_one_minus_p():
    x = torch.empty(1000, 1001)  # not a multiple of 4 elements
    for p in (0.05, 0.5):
        mask = keep_mask(x, p)
        assert mask.shape == x.shape and mask.dtype == torch.bool
        assert abs(mask.float().mean().item() - (1 - p)) < 4 * math.sqrt(p * (1 - p) / x.numel())
        # each of the four 16-bit chunks of a random draw has the same keep rate
        chunks = mask.view(-1)[: x.numel() // 4 * 4].view(-1, 4).float().mean(0)
        assert (chunks - (1 - p)).abs().max() < 0.01


@pytest.mark.parametrize("layer_type", ["linear", "conv1d"])
@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("position_bias,tokens", [(True, 7), (False, 1), (False, 7)])
def test_fused_gradients_match_plain_autograd(layer_type, dora, position_bias, tokens):
    """Every path of the fused update: with a per-token factor, and without one for few tokens (rank-r products)
    and for many (the update merged into the weight, W0 + s B A)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(10, 12) if layer_type == "linear" else Conv1D(12, 10)
    base.requires_grad_(False)
    context = PositionContext()
    layer = HyLoRADALinear(base, hy_config(use_dora=dora, position_bias=position_bias), context)
    perturb(layer)
    n = 2 * tokens
    table = torch.randn(8, requires_grad=True)
    buckets = torch.randint(0, 8, (n,))
    x = torch.randn(2, tokens, 10, requires_grad=True)
    grad_out = torch.randn(2, tokens, 12)
    wrt = [x, layer.lora_A, layer.lora_B] + ([layer.position_gate, table] if position_bias else [])
    wrt += [layer.lora_magnitude] if dora else []

    context.bias_term = torch.tanh(table)[buckets].unsqueeze(-1)
    fused = layer(x)
    # merged exactly when N (in + out) > in out, i.e. 2 * tokens * 22 > 120, and nothing is per token
    assert fused.grad_fn.next_functions[0][0].merged == (not position_bias and n * 22 > 120)  # under the view
    fused_grads = torch.autograd.grad(fused, wrt, grad_out)

    context.bias_term = torch.tanh(table)[buckets].unsqueeze(-1)
    factor = 1 + torch.sigmoid(layer.position_gate) * context.bias_term if position_bias else None
    plain = layer._forward_autograd(x.reshape(n, 10), factor, layer.row_norm() if dora else None).view(2, tokens, 12)
    plain_grads = torch.autograd.grad(plain, wrt, grad_out)

    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fused_dropout_gradients_match_a_hand_written_reference():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 24).requires_grad_(False)
    layer = HyLoRADALinear(base, hy_config(dropout=0.3, position_bias=False)).train()
    perturb(layer)
    x = torch.randn(5, 16, requires_grad=True)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    mask = keep_mask(x, 0.3)  # the same draw
    a, b = layer.lora_A.detach().requires_grad_(), layer.lora_B.detach().requires_grad_()
    xr = x.detach().requires_grad_()
    reference = base(xr) + layer.scaling * ((xr * mask / 0.7) @ a.t()) @ b.t()
    grad_out = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, layer.lora_A, layer.lora_B], grad_out)
    want = torch.autograd.grad(reference, [xr, a, b], grad_out)
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer_type", ["linear", "conv1d"])
def test_dora_row_norm_equals_the_norm_of_the_formed_weight_and_follows_updates(layer_type):
    torch.manual_seed(0)
    base = torch.nn.Linear(20, 12) if layer_type == "linear" else Conv1D(12, 20)
    layer = HyLoRADALinear(base.requires_grad_(False), hy_config(use_dora=True, position_bias=False)).eval()
    perturb(layer)

    def formed():
        w0 = base.weight.t() if layer_type == "conv1d" else base.weight
        return torch.linalg.norm(w0 + layer.scaling * layer.lora_B @ layer.lora_A, dim=1)

    torch.testing.assert_close(layer.row_norm(), formed(), rtol=1e-5, atol=1e-6)
    first = layer.row_norm()
    assert layer.row_norm() is first  # cached while nothing changed
    with torch.no_grad():
        layer.lora_B.mul_(3.0)  # an in-place update (as an optimizer step) bumps the version
    torch.testing.assert_close(layer.row_norm(), formed(), rtol=1e-5, atol=1e-6)
    x = torch.randn(3, 20)
    expected = (layer.lora_magnitude / formed()) * (x @ (base.weight.t() if layer_type == "linear" else base.weight)
                                                    + layer.scaling * x @ layer.lora_A.t() @ layer.lora_B.t())
    torch.testing.assert_close(layer(x), expected + base.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer_type", ["linear", "conv1d"])
def test_dora_row_norm_of_a_bf16_base_never_holds_a_float32_copy_of_the_whole_weight(layer_type, monkeypatch):
    """float32 adapters on a bf16 W0 [12, 20]: the norm reads W0 in float32 a block of rows at a time (ROW_NORM_BLOCK
    set to 3 rows here), equals the norm of the formed float32 weight, and no tensor of float32 as large as W0 is
    ever made (every op's output is watched)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lmlab.hylorada import layers

    torch.manual_seed(0)
    base = torch.nn.Linear(20, 12) if layer_type == "linear" else Conv1D(12, 20)
    base = base.to(torch.bfloat16).requires_grad_(False)
    layer = HyLoRADALinear(base, hy_config(use_dora=True, position_bias=False))
    assert layer.lora_A.dtype == torch.float32
    perturb(layer)
    monkeypatch.setattr(layers, "ROW_NORM_BLOCK", 3 * 20)
    layer._norm = layer._w0_sq = None

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    Largest.largest = max(Largest.largest, t.numel())
            return out

    with torch.no_grad(), Largest():
        norm = layer.row_norm()
    # a block of W0 or the adapter's own factors (views of A [r, 20], B [12, r]), never the whole [12, 20]
    assert Largest.largest <= max(3 * 20, layer.lora_A.numel(), layer.lora_B.numel()) < 12 * 20
    w0 = (base.weight.t() if layer_type == "conv1d" else base.weight).float()
    formed = torch.linalg.norm(w0 + layer.scaling * layer.lora_B @ layer.lora_A, dim=1)
    torch.testing.assert_close(norm, formed, rtol=1e-5, atol=1e-6)


def test_a_small_change_of_dora_s_magnitude_reaches_the_output_of_a_bf16_base_under_autocast():
    """DoRA's row scale m / ||W|| is about 1; rounded to bf16 before it multiplies (spacing 2^-8 near 1) a change of
    the magnitude below about 0.4% would leave the forward pass exactly as it was. Kept in float32 and rounded once
    with the product, a 0.3% change moves the bf16 output as the float32 product says it should."""
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 48).to(torch.bfloat16).requires_grad_(False)
    layer = HyLoRADALinear(base, hy_config(use_dora=True, position_bias=False)).eval()
    perturb(layer)
    with torch.no_grad():  # the magnitude as DoRA starts it and keeps it near: the norm itself, a scale of 1
        layer.lora_magnitude.copy_(layer.row_norm())
    x = torch.randn(32, 64).to(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = layer(x)
        layer.lora_magnitude.mul_(1 + 3e-3)
        after = layer(x)
    assert before.dtype == after.dtype == torch.bfloat16
    changed = (after != before).float().mean().item()
    assert changed > 0.2, changed  # a 0.3% change crosses the bf16 rounding of a good share of the outputs
    # on average the outputs scale by the change (each rounded to bf16 once)
    ratio = (after.float().abs().sum() / before.float().abs().sum()).item()
    assert ratio == pytest.approx(1 + 3e-3, abs=1e-3)


# ---------------------------------------------------------------------------------------------------
# Targets and bookkeeping


def test_default_and_all_linear_targets():
    gpt2 = apply_hylorada(tiny_gpt2(), hy_config())
    assert hylorada_state(gpt2).adapted == [f"transformer.h.{i}.attn.{n}" for i in (0, 1) for n in ("c_attn", "c_proj")]
    llama = apply_hylorada(tiny_llama(), hy_config(target_modules="all-linear"))
    adapted = hylorada_state(llama).adapted
    assert len(adapted) == 2 * 7 and "lm_head" not in adapted
    assert all(n.startswith("model.layers.") for n in adapted)


@pytest.mark.parametrize("arch", ["gpt_neox", "mistral", "qwen2"])
def test_default_targets_of_other_architectures(arch):
    from transformers import AutoConfig, AutoModelForCausalLM

    heads = {} if arch == "gpt_neox" else {"num_key_value_heads": 2}
    config = AutoConfig.for_model(arch, vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=CONTEXT, **heads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = token_batch()
    reference = lm_logits(model, ids)
    apply_hylorada(model, hy_config(landmarks="position_adaptive"))
    suffixes = {"gpt_neox": ("attention.query_key_value", "attention.dense")}.get(
        arch, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"))
    assert [n.split(".", 3)[-1] for n in hylorada_state(model).adapted] == list(suffixes) * 2
    with torch.no_grad():
        hylorada_state(model).landmarks.scale.zero_()  # landmarks found the final norm and are a no-op at 0
    assert torch.equal(lm_logits(model, ids), reference)


def test_component_param_counts_match_closed_forms():
    d, k, nb, r = 64, 4, 8, 4
    model = apply_hylorada(tiny_gpt2(), hy_config(use_dora=True, landmarks="learnable_bucket",
                                                  train_embeddings=True, train_norms=True))
    counts = component_param_counts(model)
    # per block: c_attn 64 -> 192, c_proj 64 -> 64
    shapes = [(64, 192), (64, 64)] * 2
    assert counts["lora"] == sum(r * (i + o) for i, o in shapes)
    assert counts["dora_magnitude"] == sum(o for _, o in shapes)
    assert counts["position_bias"] == nb + len(shapes)
    assert counts["landmarks"] == k * d + nb * k + d * k + 1  # docs/hylorada.md s. 4
    assert counts["bucket_boundaries"] == nb - 1
    assert counts["embeddings"] == VOCAB * d + CONTEXT * d  # wte (tied with the head) + wpe
    assert counts["norms"] == 5 * 2 * d  # ln_1, ln_2 per block and ln_f, weight + bias
    assert counts == component_param_counts(model, trainable_only=True)
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    for module in model.modules():  # adapters held at 0, as in the landmarks-only positive control
        if isinstance(module, HyLoRADALinear):
            module.lora_A.requires_grad_(False)
            module.lora_B.requires_grad_(False)
    trainable = component_param_counts(model, trainable_only=True)
    assert trainable == {**counts, "lora": 0}
    assert sum(trainable.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_learned_boundaries_rules_penalty_and_freeze():
    config = hy_config(landmarks="learnable_bucket", boundary_lr=5e-2, boundary_diversity=1.0, boundary_freeze_steps=1)
    model = apply_hylorada(tiny_llama(), config).train()
    info = learned_boundaries(model)
    assert info["initial"] == bucket_edges(8, CONTEXT, "log")
    torch.testing.assert_close(torch.tensor(info["learned"]), torch.tensor(info["initial"], dtype=torch.float))

    groups = param_groups(model, lr=1e-3, weight_decay=0.1, rules=optimizer_rules(config))
    boundary_group = [g for g in groups if any(p is boundary_parameters(model)[0] for p in g["params"])]
    assert len(boundary_group) == 1 and boundary_group[0]["lr"] == 5e-2 and len(boundary_group[0]["params"]) == 1
    assert optimizer_rules(hy_config()) == []

    assert auxiliary_loss(model).item() == 0.0  # boundaries at the fixed edges: no closing up yet
    optimizer = torch.optim.AdamW(groups)
    ids = token_batch(2, 24)
    for step in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        held = drop_frozen_boundary_grads(model, step)
        optimizer.step()
        optimizer.zero_grad()
        learned = learned_boundaries(model)["learned"]
        if step == 0:
            assert held and learned == info["learned"]  # frozen for the first boundary_freeze_steps
    assert not held and learned != info["learned"]

    with torch.no_grad():  # squeeze two boundaries together: the penalty rises and pushes them apart
        buckets = hylorada_state(model).landmarks.buckets
        buckets.boundaries[3] = buckets.boundaries[2] + 1e-4
    penalty = auxiliary_loss(model)
    assert penalty.item() > 0
    penalty.backward()
    assert buckets.boundaries.grad[2] > 0 > buckets.boundaries.grad[3]
    assert auxiliary_loss(apply_hylorada(tiny_llama(), hy_config(landmarks="learnable_bucket"))).item() == 0.0


def test_hylorada_parts_follow_the_model_to_another_dtype():
    model = apply_hylorada(tiny_llama(), hy_config(landmarks="learnable_bucket")).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    ids = token_batch()
    logits = lm_logits(model, ids)
    assert logits.dtype == torch.float64 and torch.isfinite(logits).all()
    assert F.softmax(logits, -1).sum(-1).sub(1).abs().max() < 1e-9


def hook_ids(model) -> list[tuple[str, str, int]]:
    """Every forward (pre-)hook registered on `model` or its submodules, by (module name, kind, hook id)."""
    return sorted((name, kind, hook_id) for name, module in model.named_modules()
                  for kind, hooks in (("pre", module._forward_pre_hooks), ("post", module._forward_hooks))
                  for hook_id in hooks)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("design", ["original", "per_layer", "position_adaptive"])
def test_hooks_are_kept_as_handles_and_removed_through_them_also_on_a_deep_copy(arch, design):
    """apply_hylorada keeps the handle of every hook it registers (model, final norm, blocks); removing the adapter
    removes exactly those, and a deep copy's handles remove the copy's hooks, never the original's."""
    import copy

    from lmlab.hylorada.io import _remove

    ids = token_batch()
    base = BUILDERS[arch]()
    before, reference = hook_ids(base), lm_logits(base, ids)
    model = apply_hylorada(base, hy_config(position_bias=True, landmarks=design))
    perturb(model)
    state = hylorada_state(model)
    registered = hook_ids(model)
    assert len(state.hook_handles) == len(registered) - len(before) > 0
    logits = lm_logits(model, ids)
    twin = copy.deepcopy(model)
    assert hook_ids(twin) == registered and torch.equal(lm_logits(twin, ids), logits)
    _remove(twin, merge=False)
    assert hook_ids(twin) == before and not hasattr(twin, "hylorada")
    assert torch.equal(lm_logits(twin, ids), reference)  # the base again, without the adapter's hooks
    assert hook_ids(model) == registered and torch.equal(lm_logits(model, ids), logits)  # the original is untouched
    _remove(model, merge=False)
    assert hook_ids(model) == before and state.hook_handles == []


@pytest.mark.parametrize("fused", [True, False])
def test_dora_uses_the_norm_of_the_current_weights_after_every_optimizer_step(fused):
    """A fused AdamW writes parameters without bumping their versions: the cached DoRA row norm must still follow
    each step (it once stayed at the first step's ||W0||, so 'DoRA' trained on a stale norm)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(10, 12)
    base.requires_grad_(False)
    layer = HyLoRADALinear(base, hy_config(use_dora=True, position_bias=False))
    optimizer = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=0.05, fused=fused)
    x = torch.randn(6, 10)
    for _ in range(3):
        layer(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            w = base.weight + layer.scaling * layer.lora_B @ layer.lora_A  # independent: form W, take row norms
            expected_norm = torch.linalg.vector_norm(w, dim=1)
            expected = (layer.lora_magnitude / expected_norm) * (x @ w.t()) + base.bias
            assert torch.allclose(layer.row_norm(), expected_norm, rtol=1e-5, atol=1e-6)
            assert torch.allclose(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert layer.lora_B.abs().sum() > 0  # the steps moved B: the norm had to change


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_position_bias_reach_is_how_far_the_layers_rescale_their_update(arch):
    """position_bias_reach's largest |factor - 1| is measured independently: in a forward pass, each adapter's update
    (its output minus the frozen layer's on the same input) over s B A x computed here, token by token, over a
    sequence that covers every bucket."""
    from lmlab.hylorada import HyLoRADALinear, position_bias_reach

    assert position_bias_reach(apply_hylorada(BUILDERS[arch](), hy_config(position_bias=False))) is None
    model = apply_hylorada(BUILDERS[arch](), hy_config(position_bias=True))
    assert position_bias_reach(model)["max_pct"] == 0.0  # at initialisation the bias is the identity
    perturb(model, std=0.5)
    layers = [m for m in model.modules() if isinstance(m, HyLoRADALinear)]
    with torch.no_grad():  # one gate far from the others, so the largest factor belongs to one adapter
        layers[1].position_gate.fill_(2.0)
    updates = []

    def keep(module, args, output):
        x = args[0].reshape(-1, module.in_features)
        plain = module.scaling * x @ module.lora_A.t() @ module.lora_B.t()  # s B A x, no position factor
        updates.append((output.reshape(-1, module.out_features) - module.base_layer(args[0]).reshape(plain.shape),
                        plain))

    handles = [m.register_forward_hook(keep) for m in layers]
    ids = token_batch(batch=1, length=CONTEXT)
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    state = hylorada_state(model)
    buckets = bucketize(torch.arange(CONTEXT), state.bucket_edges)  # one unpadded sequence: positions 0..T-1
    assert set(buckets.tolist()) == set(range(hy_config().num_buckets))  # every bucket's factor was seen
    ratios = []
    for with_bias, without in updates:
        ratio = (with_bias * without).sum(-1) / (without * without).sum(-1)  # per token: the factor
        assert torch.allclose(with_bias, ratio[:, None] * without, rtol=1e-4, atol=1e-3)  # one factor per token
        ratios.append(ratio)
    ratios = torch.cat(ratios)
    largest = float((ratios - 1).abs().max())
    assert largest > 0.3  # the perturbed bias rescales some update by far more than rounding
    # per adapter, the largest difference between two tokens' factors: every bucket occurs, so every bucket pair
    spread = max(float(r.max() - r.min()) for r in ratios.split(CONTEXT))
    assert spread > 0.1
    reach = position_bias_reach(model)
    assert reach["max_pct"] == pytest.approx(100 * largest, rel=1e-4)
    assert reach["spread_pct"] == pytest.approx(100 * spread, rel=1e-4)
    assert reach["factor_range"] == pytest.approx([float(ratios.min()), float(ratios.max())], rel=1e-4)
    assert reach["adapters"] == len(layers)
    assert "token_mean_pct" not in reach
    # at the average token: the forward pass's factors of one window, averaged over its tokens and every adapter
    assert position_bias_reach(model, length=CONTEXT)["token_mean_pct"] == pytest.approx(
        100 * float((ratios - 1).abs().mean()), rel=1e-4)


def test_bias_lr_gives_the_table_and_every_gate_their_own_group():
    from lmlab.hylorada import HyLoRADALinear

    model = apply_hylorada(tiny_llama(), hy_config(position_bias=True, bias_lr=0.05))
    bias = [model.hylorada.position_bias.table] + [m.position_gate for m in model.modules()
                                                  if isinstance(m, HyLoRADALinear)]
    groups = param_groups(model, lr=1e-3, weight_decay=0.1, rules=optimizer_rules(model.hylorada.config))
    own = [g for g in groups if g["lr"] == 0.05]
    assert len(own) == 1 and own[0]["weight_decay"] == 0.0
    assert {id(p) for p in own[0]["params"]} == {id(p) for p in bias}
    assert all(g["lr"] == 1e-3 for g in groups if g is not own[0])  # LoRA and the landmarks keep the run's
    assert optimizer_rules(hy_config(position_bias=False, bias_lr=0.05)) == []  # nothing to apply it to
