"""The loss without the full logits (lmlab.engine.lmhead, `train.loss_chunk`): the chunked LM head + cross-entropy
gives the plain path's loss and gradients (float32 and float64, ignored labels, token weights, bias), HF and MU
models train to the same losses with it, and no [tokens, vocab] tensor is formed or kept; `train.kernels=liger`
without liger-kernel or a GPU is one ConfigError."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lmlab.engine import lmhead
from lmlab.engine.losses import LossSettings, causal_lm_loss, collate_lm, model_logits
from lmlab.engine.train import TrainConfig, train
from lmlab.errors import ConfigError
from lmlab.mu import DenseConfig, DenseModel, MUConfig, MUModel

VOCAB = 97


def assert_relative(got: torch.Tensor, want: torch.Tensor, rel: float, what: str = "") -> None:
    """Equal to `rel` relative to the tensor's scale (the largest magnitude): single elements that nearly cancel may
    differ by more, relative to themselves, in float32."""
    assert got.shape == want.shape and got.dtype == want.dtype, what
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= rel * scale, (what, (got - want).abs().max().item(), scale)


def reference(hidden, weight, bias, labels, row_weights):
    """F.cross_entropy on the full logits, in the inputs' dtype."""
    logits = hidden @ weight.t() + (bias if bias is not None else 0)
    rows = F.cross_entropy(logits, labels, ignore_index=-100, reduction="none")
    return (rows * row_weights).sum() if row_weights is not None else rows.sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_chunked_loss_and_gradients_equal_cross_entropy_on_the_full_logits(dtype, chunk, with_bias, weighted):
    gen = torch.Generator().manual_seed(chunk)
    n, d = 37, 16
    hidden = torch.randn(n, d, generator=gen, dtype=dtype)
    weight = torch.randn(VOCAB, d, generator=gen, dtype=dtype)
    bias = torch.randn(VOCAB, generator=gen, dtype=dtype) if with_bias else None
    labels = torch.randint(0, VOCAB, (n,), generator=gen)
    labels[::4] = -100  # ignored rows (padding, the last position)
    row_weights = torch.rand(n, generator=gen, dtype=dtype) * 3 if weighted else None
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    results = []
    for fn in (lambda *a: lmhead.linear_nll(*a, chunk=chunk), reference):
        inputs = [t.clone().requires_grad_() for t in leaves]
        h, w, b = inputs[0], inputs[1], inputs[2] if with_bias else None
        loss = fn(h, w, b, labels, row_weights)
        (2.5 * loss).backward()
        results.append((loss.detach(), [t.grad for t in inputs]))
    (loss, grads), (expected, expected_grads) = results
    assert loss.dtype == dtype
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    for got, want in zip(grads, expected_grads, strict=True):
        assert_relative(got, want, 1e-5 if dtype == torch.float32 else 1e-12)


def test_chunked_loss_in_bf16_matches_the_plain_paths_rounding():
    """Low precision: the logits in bf16 (what the head computes under autocast), the softmax in float32."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 32, generator=gen).bfloat16()
    weight = (torch.randn(VOCAB, 32, generator=gen) * 0.2).bfloat16()
    labels = torch.randint(0, VOCAB, (40,), generator=gen)
    h = hidden.clone().requires_grad_()
    loss = lmhead.linear_nll(h, weight, None, labels, chunk=9)
    loss.backward()
    plain = hidden.clone().requires_grad_()
    expected = F.cross_entropy((plain @ weight.t()).float(), labels, reduction="sum")
    expected.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(h.grad.float(), plain.grad.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU"))])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_chunked_loss_under_autocast_matches_the_plain_path_under_the_same_autocast(name, device):
    """What a GPU run does (bf16 autocast over a float32 model), on the CPU's bf16 autocast and on a GPU's where there
    is one: the head's matmul in bf16 on both paths, so loss and gradients agree to bf16 rounding."""
    batch = {k: v.to(device) for k, v in collate_lm(examples(4, fixed=False)).items()}
    results = []
    for chunk in (0, 5):
        model = MODELS[name]().to(device)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = causal_lm_loss(model, batch, LossSettings(chunk=chunk)).total
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (plain, plain_grads), (chunked, grads) = results
    assert plain.dtype == chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, plain, rtol=1e-3, atol=0)
    for n, g in plain_grads.items():
        assert_relative(grads[n], g, 2e-2, n)


def test_fp16_gradients_under_a_loss_scale_above_the_fp16_range_stay_finite():
    """GradScaler starts at 65536, more than float16 holds: the scaled gradients must still come out finite and
    equal to the scale times the unscaled ones (a float16 base with precision=fp16)."""
    gen = torch.Generator().manual_seed(1)
    hidden = (torch.randn(24, 16, generator=gen) * 0.5).half()
    weight = (torch.randn(VOCAB, 16, generator=gen) * 0.2).half()
    labels = torch.randint(0, VOCAB, (24,), generator=gen)
    grads = []
    for scale in (65536.0, 1.0):
        h = hidden.clone().requires_grad_()
        (lmhead.linear_nll(h, weight, None, labels, chunk=5) * torch.tensor(scale)).backward()
        grads.append(h.grad)
    scaled, plain = grads
    assert scaled.dtype == torch.float16 and torch.isfinite(scaled).all()
    torch.testing.assert_close(scaled.float() / 65536, plain.float(), rtol=2e-3, atol=1e-6)


def test_auto_chunks_only_large_logits():
    assert lmhead.chunk_size("auto", 512, 384) is None  # 0.2M logits: the plain path
    assert lmhead.chunk_size("auto", 131_072, 128_256) == lmhead.AUTO_LOGITS // 128_256  # 523 tokens per chunk
    assert lmhead.chunk_size(0, 10**6, 10**5) is None and lmhead.chunk_size(None, 10**6, 10**5) is None
    assert lmhead.chunk_size(256, 8, 8) == 256


# ---------------------------------------------------------------------------------------------------
# Models


def llama() -> nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        pad_token_id=0))


def gpt2() -> nn.Module:  # tied embeddings: the head's weight is the input embedding
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                      bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0))


def mu() -> nn.Module:
    torch.manual_seed(0)
    return MUModel(MUConfig(vocab_size=VOCAB, max_seq_len=24, n_layers=2))


def dense() -> nn.Module:
    torch.manual_seed(0)
    return DenseModel(DenseConfig(vocab_size=VOCAB, max_seq_len=24, width=32, n_layers=2, n_heads=2))


MODELS = {"llama": llama, "gpt2": gpt2, "mu": mu, "dense": dense}


def examples(n: int, fixed: bool, weighted: bool = False) -> list[dict]:
    gen = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        length = 24 if fixed else int(torch.randint(4, 20, (1,), generator=gen))
        e = {"input_ids": torch.randint(3, VOCAB, (length,), generator=gen).tolist()}
        if weighted:
            e["loss_weights"] = (torch.rand(length, generator=gen) * 2).tolist()
        out.append(e)
    return out


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("weighted", [False, True])
def test_causal_lm_loss_through_the_chunked_head_equals_the_plain_path(name, weighted):
    model = MODELS[name]()
    batch = collate_lm(examples(4, fixed=name in ("mu", "dense"), weighted=weighted))
    head = lmhead.output_head(model)
    assert head is not None and head.weight is model.get_output_embeddings().weight
    shapes = []
    forward = model.forward

    def recorded(*args, **kwargs):  # the logits the model's forward returns
        out = forward(*args, **kwargs)
        shapes.append(tuple(model_logits(out).shape))
        return out

    model.forward = recorded
    runs = []
    for settings in (LossSettings(chunk=0), LossSettings(chunk=5)):
        model.zero_grad()
        out = causal_lm_loss(model, batch, settings)
        out.total.backward()
        runs.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (plain, plain_grads), (chunked, chunked_grads) = runs
    b, t = batch["input_ids"].shape
    assert shapes == [(b, t, VOCAB), (b, 0, VOCAB)]  # the chunked path gave the head no tokens: no full logits
    assert float(chunked.weight) == pytest.approx(float(plain.weight))
    torch.testing.assert_close(chunked.total, plain.total, rtol=1e-5, atol=0)
    assert plain_grads.keys() == chunked_grads.keys()
    for key, grad in plain_grads.items():
        assert_relative(chunked_grads[key], grad, 1e-5, key)


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an operation produced within the block (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_the_chunked_path_never_forms_a_tokens_by_vocab_tensor():
    vocab = 2048  # the logits dwarf everything else of this model
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0))
    batch = collate_lm(examples(4, fixed=False))
    tokens = batch["input_ids"].numel()
    largest = {}
    for chunk in (0, 8):
        with LargestTensor() as seen:
            causal_lm_loss(model, batch, LossSettings(chunk=chunk)).total.backward()
        largest[chunk] = seen.largest
    assert largest[0] >= tokens * vocab  # the plain path: the full logits and their gradient
    assert largest[8] == vocab * 16  # the head's weight and its gradient; the logits of 8 tokens at a time (8 x vocab)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_training_with_loss_chunks_gives_the_plain_losses(name):
    data = examples(8, fixed=name in ("mu", "dense"))
    losses = {}
    for chunk in (0, 7, "auto"):
        cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-2, log_every=1, loss_chunk=chunk)
        result = train(MODELS[name](), data, cfg, seed=1, progress=False, device="cpu")
        losses[chunk] = [h["loss"] for h in result.history]
    assert losses["auto"] == losses[0]  # small batches: auto keeps the plain path, bit for bit
    assert losses[7] == pytest.approx(losses[0], rel=1e-5)


def test_a_head_the_chunks_cannot_stand_in_for_keeps_the_plain_path():
    model = llama()
    model.config.final_logit_softcapping = 30.0  # a transform after the head
    assert lmhead.output_head(model) is None
    wrapped = copy.deepcopy(llama())
    wrapped.lm_head.register_forward_hook(lambda module, args, out: out * 2)  # someone's hook on the head
    assert lmhead.output_head(wrapped) is None
    batch = collate_lm(examples(2, fixed=False))
    torch.testing.assert_close(causal_lm_loss(wrapped, batch, LossSettings(chunk=4)).total,
                               causal_lm_loss(wrapped, batch, LossSettings(chunk=0)).total)


def test_liger_kernels_without_liger_or_a_gpu_are_one_config_error():
    cfg = TrainConfig(epochs=1, batch_size=2, kernels="liger")
    expected = (r"^train.kernels=liger needs liger-kernel, which is not installed: pip install 'lmlab\[gpu\]'"
                r"|^train.kernels=liger runs Triton kernels on CUDA")  # the second where liger-kernel is installed
    with pytest.raises(ConfigError, match=expected):
        train(llama(), examples(2, fixed=False), cfg, seed=0, progress=False, device="cpu")


def test_liger_kernels_patch_the_model_for_the_block_and_put_the_modeling_module_back(monkeypatch):
    """The wiring, on CPU, with a stand-in for liger-kernel that patches as liger does: the model's modules and a
    module-level function of the transformers modeling file (RoPE). After the block the file is as it was."""
    import sys
    import types

    from transformers.models.llama import modeling_llama

    from lmlab.engine.train import kernels

    calls = []

    def apply_to_instance(model, **options):
        calls.append((model, options))
        modeling_llama.apply_rotary_pos_emb = "liger rope"  # what liger's apply_liger_kernel_to_llama does
        modeling_llama.LIGER_ADDED = True
        for m in model.modules():  # and on the instances: a bound forward and liger's settings on each norm
            if type(m).__name__ == "LlamaRMSNorm":
                m.forward = types.MethodType(lambda self, x: "liger norm", m)
                m.casting_mode = "llama"

    package = types.ModuleType("liger_kernel")
    package.__path__ = []
    transformers_part = types.ModuleType("liger_kernel.transformers")
    transformers_part._apply_liger_kernel_to_instance = apply_to_instance
    monkey_patch = types.ModuleType("liger_kernel.transformers.monkey_patch")
    monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": None, "mistral": None}
    transformers_part.monkey_patch = monkey_patch
    for name, module in (("liger_kernel", package), ("liger_kernel.transformers", transformers_part),
                         ("liger_kernel.transformers.monkey_patch", monkey_patch)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object() if name == "liger_kernel" else None)
    rope = modeling_llama.apply_rotary_pos_emb
    model = llama()
    norm = next(m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm")
    with kernels(model, "liger", torch.device("cuda")):  # the device is only checked: nothing runs on it
        assert modeling_llama.apply_rotary_pos_emb == "liger rope"
        assert norm(torch.ones(2, norm.weight.shape[0])) == "liger norm"
    # the trained model runs the plain code again (Triton kernels would fail off CUDA)
    assert "forward" not in vars(norm) and not hasattr(norm, "casting_mode")
    assert torch.is_tensor(norm(torch.ones(2, norm.weight.shape[0])))
    assert calls == [(model, {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                              "fused_linear_cross_entropy": False})]
    assert modeling_llama.apply_rotary_pos_emb is rope and not hasattr(modeling_llama, "LIGER_ADDED")
    gpt = gpt2()
    gpt.config.model_type = "gpt2"
    with pytest.raises(ConfigError, match="no kernels for model type 'gpt2'"), kernels(gpt, "liger",
                                                                                       torch.device("cuda")):
        pass
    with kernels(model, "torch", torch.device("cpu")):
        pass
    assert len(calls) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="liger's Triton kernels need a CUDA GPU")
def test_liger_kernels_train_to_the_plain_losses_in_bf16():
    pytest.importorskip("liger_kernel")
    data = examples(8, fixed=True)
    losses = {}
    for choice in ("torch", "liger", "torch"):
        model = llama().to(torch.bfloat16)
        cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-3, log_every=1, kernels=choice, precision="bf16")
        result = train(model, data, cfg, seed=1, progress=False, device="cuda")
        losses.setdefault(choice, []).append([h["loss"] for h in result.history])
    plain, again = losses["torch"]
    assert plain == pytest.approx(again, rel=1e-6)  # the liger run left the plain path as it was
    assert losses["liger"][0] == pytest.approx(plain, rel=2e-2)  # bf16 rounding, fused vs plain
