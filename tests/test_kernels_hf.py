"""lmlab's attention for Hugging Face models: the kernel on separate q, k, v (grouped-query, strided) against a
float64 loop and SDPA; which calls take it; whole models and the training engine with it switched on and off."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from helpers import Callbacks, causal_attention_reference, value_and_grads
from lmlab.engine.train import TrainConfig, causal_lm_loss, train
from lmlab.kernels import (
    attention,
    hf_attention_forward,
    kernel_attention,
    kernel_available,
    restore_attention,
    use_kernel_attention,
)
from lmlab.kernels.build import DISABLE_ENV

needs_kernel = pytest.mark.skipif(not kernel_available(), reason="no C compiler with OpenMP here: lmlab's attention "
                                  "is SDPA (same results)")


class Causal(nn.Module):
    is_causal = True


def count_kernel_calls(monkeypatch) -> list:
    calls = []
    original = attention._AttentionCPU.apply

    def counting(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(attention._AttentionCPU, "apply", counting)
    return calls


@needs_kernel
@pytest.mark.parametrize("B,H,Hkv,T,D", [(2, 4, 4, 37, 64), (1, 2, 2, 1, 8), (3, 6, 2, 130, 24), (1, 2, 1, 64, 128),
                                         (2, 3, 3, 17, 4)])
def test_kernel_on_separate_heads_matches_float64_reference(B, H, Hkv, T, D, monkeypatch):
    """Grouped-query heads, a value tensor that is a strided view (as transformers passes it), the model's scaling:
    value and every gradient match float64 and are no further from it than torch's float32 SDPA."""
    calls = count_kernel_calls(monkeypatch)
    torch.manual_seed(T + D)
    scale = 0.7 / math.sqrt(D)
    q, k = torch.randn(B, H, T, D), 2.0 * torch.randn(B, Hkv, T, D)
    v = torch.randn(B, T, Hkv, D).transpose(1, 2)  # [B, Hkv, T, D] view of a [B, T, Hkv, D] projection
    grad_out = torch.randn(B, T, H, D)
    ref_out, ref_grads = value_and_grads(lambda *x: causal_attention_reference(*x, scale), (q, k, v),
                                           grad_out)
    out, grads = value_and_grads(lambda *x: hf_attention_forward(Causal(), *x, None, scaling=scale)[0], (q, k, v),
                                 grad_out)
    assert len(calls) == 1

    def sdpa(q, k, v):
        group = H // Hkv
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(1, 2)

    sdpa_out, sdpa_grads = value_and_grads(sdpa, (q, k, v), grad_out)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=2e-6 * ref_out.abs().max().item() + 1e-6)
    assert (out - ref_out).abs().max() <= 4 * (sdpa_out - ref_out).abs().max() + 1e-7
    size = max(g.abs().max().item() for g in ref_grads)  # dq = 0 exactly at T = 1: compare on the common scale
    for name, grad, ref, sdpa_grad in zip("qkv", grads, ref_grads, sdpa_grads, strict=True):
        torch.testing.assert_close(grad, ref, rtol=0, atol=2e-6 * size + 1e-6, msg=name)
        assert (grad - ref).abs().max() <= 4 * (sdpa_grad - ref).abs().max() + 2e-7 * size, name


@needs_kernel
def test_a_nan_value_in_the_future_does_not_reach_earlier_queries():
    """Future positions are selected away, not multiplied by zero: NaN * 0 would poison every query of a block."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    v[0, 1, 21, 3] = float("nan")
    out = hf_attention_forward(Causal(), q, k, v, None)[0]  # [B, T, H, D]
    assert torch.isfinite(out[0, :21]).all() and torch.isfinite(out[0, :, 0]).all()
    assert torch.isnan(out[0, 21:, 1, 3]).all()


@pytest.mark.parametrize("case", ["mask", "dropout", "cache", "sliding_window", "not_causal", "float64"])
def test_anything_but_plain_causal_self_attention_goes_to_sdpa(case, monkeypatch):
    """Each of these leaves the kernel alone and gives exactly what transformers' SDPA attention gives."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    calls = count_kernel_calls(monkeypatch)
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    module, mask, kwargs = Causal(), None, {"scaling": 0.3}
    if case == "mask":
        mask = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
        mask[1, :, :, 0] = False  # left padding
    elif case == "dropout":
        kwargs["dropout"] = 0.5
    elif case == "cache":  # decoding: one new query against the cached keys
        q = q[:, :, -1:]
    elif case == "sliding_window":
        kwargs["sliding_window"] = 3
    elif case == "not_causal":
        module.is_causal = False
    else:
        q, k, v = q.double(), k.double(), v.double()
    module.num_key_value_groups = 2
    torch.manual_seed(1)
    out = hf_attention_forward(module, q, k, v, mask, **kwargs)[0]
    torch.manual_seed(1)
    expected = sdpa_attention_forward(module, q, k, v, mask, **kwargs)[0]
    assert calls == []
    assert torch.equal(out, expected)


def tiny(arch: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=96, n_positions=64, n_embd=64, n_layer=2, n_head=4, initializer_range=0.1,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **overrides)
        return GPT2LMHeadModel(config)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                         initializer_range=0.1, **overrides)
    return LlamaForCausalLM(config)


def loss_and_grads(model: nn.Module, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = causal_lm_loss(model, batch)
    (out.total / out.weight).backward()
    return out.total.item() / out.weight.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@needs_kernel
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_models_train_the_same_on_lmlab_attention_and_switch_back(arch, monkeypatch):
    """A whole model's loss and every parameter gradient agree with SDPA's; every layer took the kernel; padding
    takes SDPA with the same logits; afterwards the model is on SDPA again."""
    calls = count_kernel_calls(monkeypatch)
    model = tiny(arch)
    ids = torch.randint(3, 96, (3, 40), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    padded = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    padded["attention_mask"][0, :5] = 0
    sdpa_loss, sdpa_grads = loss_and_grads(model, batch)
    with torch.no_grad():
        sdpa_padded = model(**padded).logits
    assert model.config._attn_implementation == "sdpa"
    with kernel_attention(model) as switched:
        assert switched == [model] and model.config._attn_implementation == "lmlab"
        loss, grads = loss_and_grads(model, batch)
        assert len(calls) == 2  # one per layer
        with torch.no_grad():
            assert torch.equal(model(**padded).logits, sdpa_padded)
        assert len(calls) == 2
    assert model.config._attn_implementation == "sdpa"
    assert loss == pytest.approx(sdpa_loss, rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, sdpa_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_generation_with_a_cache_gives_the_same_tokens():
    model = tiny("llama").eval()
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    expected = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with kernel_attention(model):
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0), expected)


def test_only_sdpa_models_are_switched(monkeypatch):
    eager = tiny("llama", attn_implementation="eager")
    assert use_kernel_attention(eager) is None and eager.config._attn_implementation == "eager"
    assert use_kernel_attention(nn.Linear(2, 2)) is None  # not a transformers model
    model = tiny("gpt2")
    monkeypatch.setenv(DISABLE_ENV, "0")
    assert use_kernel_attention(model) is None and model.config._attn_implementation == "sdpa"
    monkeypatch.delenv(DISABLE_ENV)
    previous = use_kernel_attention(model)
    assert previous == "sdpa" and model.config._attn_implementation == "lmlab"
    restore_attention(model, previous)
    assert model.config._attn_implementation == "sdpa"


def test_the_training_engine_trains_on_lmlab_attention_and_switches_back():
    model = tiny("gpt2")
    seen = []
    data = [{"input_ids": list(range(3, 23))} for _ in range(4)]
    cfg = TrainConfig(max_steps=2, batch_size=2, warmup_steps=0, log_every=1)
    train(model, data, cfg, seed=0, progress=False, device="cpu",
          hooks=Callbacks(before_step=lambda step, m: seen.append(m.config._attn_implementation)))
    assert seen == ["lmlab", "lmlab"] and model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="no trainable parameters"):  # and back after an error, too
        train(model.requires_grad_(False), data, cfg, seed=0, progress=False, device="cpu")
    assert model.config._attn_implementation == "sdpa"


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize(("choice", "during", "device"),
                         [("auto", "lmlab", "cpu"), ("lmlab", "lmlab", "cpu"), ("sdpa", "sdpa", "cpu"),
                          pytest.param("auto", "sdpa", "cuda", marks=GPU)])
def test_train_attention_chooses_the_attention_the_model_trains_on(choice, during, device):
    """`train.attention`: auto is lmlab's on CPU and the model's own on a GPU, sdpa keeps the model's own; the
    model is back on its own after."""
    model = tiny("gpt2")
    seen = []
    data = [{"input_ids": list(range(3, 23))} for _ in range(4)]
    cfg = TrainConfig(max_steps=2, batch_size=2, warmup_steps=0, attention=choice)
    train(model, data, cfg, seed=0, progress=False, device=device,
          hooks=Callbacks(before_step=lambda step, m: seen.append(m.config._attn_implementation)))
    assert seen == [during, during] and model.config._attn_implementation == "sdpa"
