"""Memory-lean training (issue 20 point 3), on the CPU: gradient checkpointing really recomputes the blocks - with
HyLoRADA's adapters, position bias and landmarks on Hugging Face models, and on MU and the dense baseline - and gives
the losses and gradients of a run without it; a model that cannot checkpoint is a ConfigError, not a silent no-op;
a bf16 base stays bf16 through the training setup while HyLoRADA's trainable weights are float32."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from helpers import Callbacks
from lmlab.engine.train import TrainConfig, train
from lmlab.errors import ConfigError
from lmlab.hylorada import HyLoRADAConfig, HyLoRADAHooks, apply_hylorada
from lmlab.mu import DenseConfig, DenseModel, MUConfig, MUModel

VOCAB = 97


def llama() -> nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        pad_token_id=0))


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                      bos_token_id=1, eos_token_id=2))


def examples(n: int, length: int | None = None) -> list[dict]:
    gen = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(3, VOCAB, (length or int(torch.randint(4, 20, (1,), generator=gen)),),
                                        generator=gen).tolist()} for _ in range(n)]


def counted(module: nn.Module) -> list[int]:
    """Count calls of `module`'s forward (module hooks may sit outside a checkpoint, so count the forward itself)."""
    calls: list[int] = []
    forward = module.forward

    def wrapper(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    module.forward = wrapper
    return calls


def one_step(model: nn.Module, inner: nn.Module, data: list[dict], checkpointing: bool, hooks=None, **cfg):
    """(loss, gradients of every trainable parameter, calls of `inner`) of one optimizer step."""
    calls = counted(inner)
    grads: dict[str, torch.Tensor] = {}

    def capture(step: int, m: nn.Module) -> None:
        grads.update({n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None})

    hooks = hooks or Callbacks()
    after = hooks.after_backward

    def after_backward(state) -> None:
        capture(state.step, state.model)
        after(state)

    hooks.after_backward = after_backward
    config = TrainConfig(epochs=1, batch_size=4, lr=1e-3, max_steps=1, warmup_steps=0, max_grad_norm=None,
                         gradient_checkpointing=checkpointing, **cfg)
    result = train(model, data, config, seed=10, hooks=hooks, progress=False, device="cpu")
    return result.final_loss, grads, len(calls)


def assert_same_step(plain: tuple, checkpointed: tuple) -> None:
    (loss, grads, calls), (loss_ckpt, grads_ckpt, calls_ckpt) = plain, checkpointed
    assert calls == 1 and calls_ckpt == 2  # the checkpointed layer ran again in the backward pass
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == grads_ckpt.keys() and grads
    for name, grad in grads.items():
        assert torch.allclose(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize(("arch", "landmarks"), [("llama", "position_adaptive"), ("llama", "per_layer"),
                                                 ("gpt2", "learnable_bucket"), ("gpt2", "original")])
def test_checkpointing_with_adapters_position_bias_and_landmarks_gives_the_same_step(arch, landmarks):
    base = {"llama": llama, "gpt2": gpt2}[arch]()
    config = HyLoRADAConfig(r=4, dropout=0.05, position_bias=True, landmarks=landmarks, num_landmarks=4,
                            num_buckets=8, use_dora=arch == "gpt2")
    model = apply_hylorada(base, config, max_positions=64)
    runs = []
    for checkpointing in (False, True):
        copied = copy.deepcopy(model)
        blocks = copied.model.layers if arch == "llama" else copied.transformer.h
        inner = blocks[1].mlp
        runs.append(one_step(copied, inner, examples(8), checkpointing, hooks=HyLoRADAHooks(config)))
        assert not blocks[1].gradient_checkpointing  # off again after training
    assert_same_step(*runs)
    names = runs[0][1].keys()
    for part in ("lora_A", "position_gate", "position_bias", "landmarks"):  # every part got a gradient
        assert any(part in name for name in names), part


@pytest.mark.parametrize("kind", ["mu", "dense"])
def test_checkpointing_mu_and_dense_gives_the_same_step_and_runs_each_layer_twice(kind):
    if kind == "mu":
        config = MUConfig(vocab_size=VOCAB, max_seq_len=16, n_layers=2, dropout=0.1)
        model, inner = MUModel(config), "ffn"
    else:
        config = DenseConfig(vocab_size=VOCAB, max_seq_len=16, width=32, n_layers=2, n_heads=2, dropout=0.1)
        model, inner = DenseModel(config), "mlp"
    runs = []
    for checkpointing in (False, True):
        copied = copy.deepcopy(model)
        runs.append(one_step(copied, getattr(copied.layers[1], inner), examples(8, length=16), checkpointing))
        assert not copied.gradient_checkpointing
    assert_same_step(*runs)  # with dropout: the recomputation draws the same masks


def test_gradient_checkpointing_on_a_model_that_cannot_is_a_config_error():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, 8)
            self.head = nn.Linear(8, VOCAB)

        def forward(self, input_ids):
            return self.head(self.embed(input_ids))

    with pytest.raises(ConfigError, match=r"^train.gradient_checkpointing: Plain cannot checkpoint its blocks"):
        one_step(Plain(), Plain(), examples(4), True)


@pytest.mark.parametrize("make", [llama, gpt2], ids=["llama", "gpt2-tied-head"])
def test_embeddings_and_norms_trained_on_a_bf16_base_are_float32_and_keep_small_updates(make):
    """LongLoRA's extras on a bf16 base (the `paper` presets on a GPU): the trained embeddings and norms are float32,
    so updates far below bf16's resolution survive; the model still computes in bf16 around them (with and without
    autocast), the chunked loss still serves a tied head, and merging gives the base's dtype back."""
    from lmlab.engine.losses import LossSettings, causal_lm_loss, collate_lm
    from lmlab.hylorada import merge_adapter

    base = make().to(torch.bfloat16)
    config = HyLoRADAConfig(r=4, dropout=0.0, position_bias=False, landmarks="none", train_embeddings=True,
                            train_norms=True)
    model = apply_hylorada(base, config, max_positions=64)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("embed" in n or "wte" in n for n in trained) and any("norm" in n or "ln_" in n for n in trained)
    assert {p.dtype for p in trained.values()} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    batch = collate_lm(examples(4))
    plain = model(input_ids=batch["input_ids"]).logits  # no autocast: float32 parts inside a bf16 model
    assert plain.dtype == torch.bfloat16 and torch.isfinite(plain.float()).all()
    chunked = causal_lm_loss(model, batch, LossSettings(chunk=8)).total
    full = causal_lm_loss(model, batch, LossSettings(chunk=0)).total
    torch.testing.assert_close(chunked, full, rtol=2e-2, atol=0)  # bf16 logits on the plain path
    embedding = model.get_input_embeddings().weight
    before = embedding.detach().clone()
    lr = 1e-5  # 1e-5 steps: far below bf16's spacing (2^-8 relative), each one kept in float32
    train(model, examples(8), TrainConfig(epochs=1, batch_size=4, lr=lr, warmup_steps=0, max_grad_norm=None,
                                          weight_decay=0.0, precision="bf16"), seed=0, progress=False, device="cpu")
    moved = (embedding.detach() - before).abs()
    assert embedding.dtype == torch.float32 and 0 < moved.max() <= 3 * lr
    assert (moved > 0).sum() > moved.numel() // 20  # the rows of the tokens seen moved: not rounded away
    merged = merge_adapter(model)
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    assert merged(input_ids=batch["input_ids"]).logits.dtype == torch.bfloat16


def test_a_bf16_base_stays_bf16_and_hyloradas_trainable_weights_are_float32():
    base = llama().to(torch.bfloat16)  # as load_causal_lm(..., dtype="bfloat16") loads it
    config = HyLoRADAConfig(r=4, dropout=0.0, position_bias=True, landmarks="position_adaptive", num_landmarks=4,
                            num_buckets=8, use_dora=True)
    model = apply_hylorada(base, config, max_positions=64)
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and trained
    assert {p.dtype for p in frozen.values()} == {torch.bfloat16}
    assert {p.dtype for p in trained.values()} == {torch.float32}  # AdamW's master weights, not bf16
    stored = {n: p.data_ptr() for n, p in frozen.items()}
    loss, grads, _ = one_step(model, model.model.layers[0].mlp, examples(8), True, hooks=HyLoRADAHooks(config),
                              precision="bf16", loss_chunk=16)
    assert torch.isfinite(torch.tensor(loss)) and grads
    for name, p in model.named_parameters():  # no float32 copy replaced a frozen weight
        if name in frozen:
            assert p.dtype == torch.bfloat16 and p.data_ptr() == stored[name], name
        else:
            assert p.dtype == torch.float32 and grads[name].dtype == torch.float32, name
