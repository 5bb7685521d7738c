"""The pieces that make HyLoRADA studies able to tell an effect from an artifact: the constant-mix landmark control,
the leaky-pooling diagnostic, the exact ablation of position components, learnable buckets at the fixed scheme's
resolution, the parameter-matched LoRA rank, packed training windows and position-resolved perplexity on given
windows. Each is checked against an independent computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmlab.data.batching import packed_examples
from lmlab.engine.optim import lr_factor
from lmlab.engine.train import TrainConfig
from lmlab.eval.perplexity import positional_perplexity
from lmlab.hylorada import apply_hylorada, learned_boundaries, position_components_removed
from lmlab.hylorada.position import LearnableBuckets, bucket_edges, bucketize, effective_buckets
from lmlab.models.hf import load_causal_lm
from lmlab.studies.hylorada_study import (
    HYLORADA,
    HyloradaStudyConfig,
    _Context,
    initial_effective_buckets,
    step_size_scale,
)
from test_hylorada_model import VOCAB, hy_config, lm_logits, perturb, tiny_llama, token_batch


def test_constant_landmarks_add_one_vector_to_every_token_whatever_its_position_or_content():
    model = apply_hylorada(tiny_llama(), hy_config(landmarks="constant", position_bias=False))
    perturb(model)
    state = model.hylorada
    hidden = torch.randn(3, 17, 64)
    state.context.positions = torch.arange(17).expand(3, 17)
    shift = state.landmarks(hidden) - hidden  # [3, 17, 64]
    expected = state.landmarks.scale * (torch.softmax(state.landmarks.logits, -1) @ state.landmarks.vectors)
    torch.testing.assert_close(shift, expected.expand_as(shift).detach(), rtol=0, atol=1e-6)
    counts = {n: p.numel() for n, p in model.named_parameters() if n.startswith("hylorada.landmarks.")}
    assert sum(counts.values()) == 4 * 64 + 4 + 1  # K d vectors + K logits + scale
    ids = token_batch()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if n.startswith("hylorada.landmarks."))


def test_leaky_pooling_lets_earlier_tokens_see_later_ones_and_causal_pooling_does_not():
    ids = token_batch(2, 20)
    changed = ids.clone()
    changed[:, 15] = (changed[:, 15] + 7) % VOCAB
    for design, leaks in (("original", False), ("original_leaky", True)):
        model = apply_hylorada(tiny_llama(), hy_config(landmarks=design, position_bias=False))
        perturb(model)
        gap = (lm_logits(model, changed)[:, :15] - lm_logits(model, ids)[:, :15]).abs().max()
        assert (gap > 1e-4) == leaks, design


@pytest.mark.parametrize("design", ["position_adaptive", "per_layer", "learnable_bucket", "constant"])
def test_removing_the_position_components_gives_the_model_without_them(design):
    model = apply_hylorada(tiny_llama(), hy_config(landmarks=design, position_bias=True))
    perturb(model)
    plain = apply_hylorada(tiny_llama(), hy_config(landmarks="none", position_bias=False))
    adapters = {n: p for n, p in model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for name, param in plain.named_parameters():
            if name in adapters:
                param.copy_(adapters[name])
    ids = token_batch(2, 24)
    before = lm_logits(model, ids)
    with position_components_removed(model):
        removed = lm_logits(model, ids)
    # equal up to float32 summation order (with a position factor the adapter takes its unmerged path)
    torch.testing.assert_close(removed, lm_logits(plain, ids), rtol=1e-5, atol=5e-5)
    assert (removed - before).abs().max() > 1e-3  # the perturbed components did change the output
    assert torch.equal(lm_logits(model, ids), before)  # and they are back


def test_configurations_differing_by_landmarks_start_from_the_same_lora_weights():
    weights = []
    for design in ("none", "position_adaptive", "per_layer"):
        torch.manual_seed(3)
        model = apply_hylorada(tiny_llama(), hy_config(landmarks=design))
        weights.append({n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("lora_A")})
    assert weights[0].keys() == weights[1].keys() and weights[0]
    for other in weights[1:]:
        assert all(torch.equal(weights[0][n], other[n]) for n in weights[0])


# ---------------------------------------------------------------------------------------------------
# Learnable buckets at the fixed scheme's resolution


def assignment(buckets: LearnableBuckets) -> torch.Tensor:
    with torch.no_grad():
        return buckets(torch.arange(buckets.max_positions).unsqueeze(0))[0]  # [positions, buckets]


def test_the_notes_temperature_distinguishes_only_a_few_buckets_and_the_relative_one_all_of_them():
    edges = bucket_edges(32, 512, "log")
    fixed = bucketize(torch.arange(512), torch.tensor(edges))
    notes = LearnableBuckets(edges, 512, 0.1, "absolute")
    # Brute force: the buckets that win at some position, and each position's weight on its fixed bucket.
    winners = set(assignment(notes).argmax(-1).tolist())
    assert notes.effective_buckets() == len(winners) == 8
    assert assignment(notes).gather(1, fixed[:, None]).mean() < 0.3
    relative = LearnableBuckets(edges, 512, 0.1, "relative")
    assert relative.effective_buckets() == 32
    assert assignment(relative).gather(1, fixed[:, None]).mean() > 0.85
    assert torch.equal(assignment(relative).argmax(-1), fixed)  # every position's largest weight is its fixed bucket


def test_straight_through_buckets_are_the_fixed_buckets_forward_and_still_learn():
    edges = bucket_edges(8, 128, "log")
    buckets = LearnableBuckets(edges, 128, 0.1, "straight_through")
    positions = torch.arange(0, 300).unsqueeze(0)  # past max_positions too
    weights = buckets(positions)[0]
    expected = F.one_hot(bucketize(positions[0], torch.tensor(edges)), 8).float()
    assert torch.equal(weights.detach(), expected)
    (weights * torch.arange(8.0)).sum().backward()
    assert buckets.boundaries.grad is not None and buckets.boundaries.grad.abs().min() > 0
    assert buckets.learned_edges() == [float(e) for e in edges]  # the fixed scheme's edges at initialisation


def test_learned_boundaries_report_resolution_and_assignment():
    model = apply_hylorada(tiny_llama(), hy_config(landmarks="learnable_bucket", boundary_assignment="absolute",
                                                   boundary_temperature=0.1))
    info = learned_boundaries(model)
    assert info["assignment"] == "absolute" and info["num_buckets"] == 8
    weights = assignment(model.hylorada.landmarks.buckets)
    assert info["effective_buckets"] == effective_buckets(weights) == len(set(weights.argmax(-1).tolist()))


def test_learned_boundaries_rebuild_the_trained_assignment_exactly_and_record_the_untrained_count():
    """Both counts of the report's sentence are recorded at training time, and the record's exact boundary values
    rebuild the trained assignment bit for bit, through JSON, for every assignment."""
    import json

    for rule in ("relative", "absolute", "straight_through"):
        model = apply_hylorada(tiny_llama(), hy_config(landmarks="learnable_bucket", boundary_assignment=rule,
                                                       boundary_temperature=0.1))
        buckets = model.hylorada.landmarks.buckets
        untrained = len(set(assignment(buckets).argmax(-1).tolist()))
        with torch.no_grad():  # a trained state: boundaries moved by odd amounts, two of them nearly merged
            buckets.boundaries.add_(torch.randn(buckets.boundaries.shape, generator=torch.Generator().manual_seed(0))
                                    * 3e-3)
            buckets.boundaries[2] = buckets.boundaries[1] + 1e-6
        info = json.loads(json.dumps(learned_boundaries(model)))
        assert info["initial_effective_buckets"] == untrained
        rebuilt = LearnableBuckets.rebuild(info)
        assert torch.equal(assignment(rebuilt), assignment(buckets))
        assert rebuilt.effective_buckets() == info["effective_buckets"] == len(set(assignment(buckets).argmax(-1)
                                                                                  .tolist()))
        assert initial_effective_buckets(info) == untrained


def test_step_size_scale_is_the_sum_and_root_sum_square_of_the_learning_rates():
    cfg = HyloradaStudyConfig(max_length=256, model="x", train=TrainConfig(epochs=1, batch_size=4, lr=2e-3,
                                                                           warmup_ratio=0.1))
    adapter = hy_config(landmarks="learnable_bucket", boundary_freeze_steps=3)
    scale = step_size_scale(cfg, adapter, steps=25, num_examples=100, lr=2e-3)
    rates = [2e-3 * lr_factor(s, 2, 25, "cosine") for s in range(3, 25)]  # 25 steps, warmup round(2.5) = 2
    assert scale["drift_consistent"] == pytest.approx(sum(rates) * 256)
    assert scale["drift_random"] == pytest.approx(math.sqrt(sum(r * r for r in rates)) * 256)


# ---------------------------------------------------------------------------------------------------
# Parameter-matched LoRA, packed windows, position-resolved perplexity on given windows


def test_the_matched_rank_is_the_smallest_with_at_least_the_candidates_parameters(tiny_llama_dir):
    cfg = HyloradaStudyConfig(model=str(tiny_llama_dir), max_length=128, adapter=hy_config())
    ctx = _Context(cfg, str(tiny_llama_dir), None, 128, [])
    rank, info = HYLORADA._matched_rank(ctx)
    base = load_causal_lm(str(tiny_llama_dir))
    hidden, layers = base.config.hidden_size, base.config.num_hidden_layers
    kv = base.config.num_key_value_heads * hidden // base.config.num_attention_heads
    per_rank = layers * ((hidden + hidden) * 2 + (hidden + kv) * 2)  # q, o: d -> d; k, v: d -> kv width
    candidate = apply_hylorada(base, cfg.adapter.model_copy(update={"position_bias": True,
                                                                  "landmarks": "position_adaptive"}))
    target = sum(p.numel() for p in candidate.parameters() if p.requires_grad)
    assert info["candidate_params"] == target and info["params"] == rank * per_rank
    assert rank * per_rank >= target > (rank - 1) * per_rank


def _adam_trained(use_rslora: bool, b_lr_factor: float, a_lr_factor: float = 1.0, steps: int = 6):
    """A tiny Llama with LoRA trained by Adam (no weight decay, no clipping, a negligible epsilon); its logits."""
    torch.manual_seed(3)
    model = apply_hylorada(tiny_llama(), hy_config(use_rslora=use_rslora, position_bias=False, landmarks="none"))
    b = [p for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]
    a = [p for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n]
    assert len(a) == len(b) > 0 and len(a) + len(b) == sum(1 for p in model.parameters() if p.requires_grad)
    lr = 1e-2
    opt = torch.optim.Adam([{"params": b, "lr": lr * b_lr_factor}, {"params": a, "lr": lr * a_lr_factor}], eps=1e-20)
    for step in range(steps):
        ids = token_batch(seed=step)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return lm_logits(model, token_batch(seed=99))


def test_rslora_at_one_rank_is_lora_with_a_larger_learning_rate_for_b():
    # docs/studies.md (`lora-lr-scaled`): Adam's update ignores the gradient's scale, so rsLoRA's scaling alpha/sqrt(r)
    # is LoRA (alpha/r) with B's learning rate raised sqrt(r)-fold - a step size, which is what the control varies.
    r = hy_config().r
    rslora = _adam_trained(True, 1.0)
    torch.testing.assert_close(_adam_trained(False, math.sqrt(r)), rslora, rtol=1e-4, atol=1e-4)
    assert (_adam_trained(False, 1.0) - rslora).abs().max() > 1e-2  # the plain LoRA step is smaller: they differ
    # the control raises A's learning rate too: a larger step, not the same model
    assert (_adam_trained(False, math.sqrt(r), math.sqrt(r)) - rslora).abs().max() > 1e-3


def test_the_learning_rate_control_trains_at_rsloras_learning_rate_times_sqrt_r(tiny_llama_dir):
    cfg = HyloradaStudyConfig(model=str(tiny_llama_dir), max_length=128, adapter=hy_config(r=9))
    ctx = _Context(cfg, str(tiny_llama_dir), None, 128, [])
    arms = HYLORADA.arms
    assert HYLORADA._lr(ctx, arms["lora-lr-scaled"], "lora-lr-scaled") == pytest.approx(3 * cfg.train.lr)
    assert HYLORADA._lr(ctx, arms["lora"], "lora") == cfg.train.lr
    ctx.lrs = {"lora": 1e-4, "rslora": 5e-4}  # chosen on the tuning seed (lr_grid): it follows rsLoRA's
    assert HYLORADA._lr(ctx, arms["lora-lr-scaled"], "lora-lr-scaled") == pytest.approx(1.5e-3)
    assert HYLORADA._lr(ctx, arms["lora"], "lora") == 1e-4


def test_packing_fills_every_window_and_keeps_document_boundaries():
    docs = [[10, 11, 12], [20, 21], [30, 31, 32, 33, 34], [40]]
    windows = packed_examples(docs, 4, separator_id=1, end_id=2)
    stream = [1, 10, 11, 12, 2, 1, 20, 21, 2, 1, 30, 31, 32, 33, 34, 2, 1, 40, 2]
    assert [w["input_ids"] for w in windows] == [stream[i:i + 4] for i in range(0, 16, 4)]
    assert all(len(w["input_ids"]) == 4 for w in windows)


def test_positional_perplexity_scores_exactly_the_given_windows(tiny_llama_dir):
    model = load_causal_lm(str(tiny_llama_dir))
    length = 20
    gen = torch.Generator().manual_seed(0)
    windows = [torch.randint(3, 300, (length,), generator=gen).tolist() for _ in range(5)]
    result = positional_perplexity(model, windows, 1, length, batch_size=2)
    nll = torch.zeros(length, dtype=torch.float64)
    with torch.no_grad():  # independent: one window at a time, position by position
        for w in windows:
            inputs = torch.tensor([[1, *w[:-1]]])
            logp = F.log_softmax(model(input_ids=inputs).logits[0].double(), -1)
            nll -= logp[torch.arange(length), torch.tensor(w)]
    decile = [min(9, int(10 * i / length)) for i in range(length)]
    for d in range(10):
        idx = [i for i in range(length) if decile[i] == d]
        assert result["decile_ppl"][d] == pytest.approx(math.exp(float(nll[idx].sum()) / (5 * len(idx))), rel=1e-5)
        assert result["decile_tokens"][d] == 5 * len(idx)
    mid = [i for i in range(length) if 0.25 <= i / length < 0.75]
    assert result["lim_ppl"] == pytest.approx(math.exp(float(nll[mid].sum()) / (5 * len(mid))), rel=1e-5)
    assert result["lim_tokens"] == 5 * len(mid)
    with pytest.raises(ValueError, match="max_length=20"):
        positional_perplexity(model, [windows[0][:-1]], 1, length)
