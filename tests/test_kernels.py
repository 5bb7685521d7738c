"""The compiled CPU causal-attention kernel against an explicit float64 softmax loop, SDPA, and its fallbacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import causal_attention_reference, value_and_grads, warnings_without_compiler
from lmlab.kernels import attention, causal_attention, kernel_available
from lmlab.kernels.build import DISABLE_ENV


def reference(qkv: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """The float64 reference (helpers.causal_attention_reference) on the [B, T, H, 3D] layout."""
    q, k, v = qkv.transpose(1, 2).split(head_dim, dim=-1)  # [B, H, T, D] each
    return causal_attention_reference(q, k, v, head_dim**-0.5)


def qkv_major(qkv: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """The same numbers as [B, T, 3, H, D] (nanoGPT's layout) from [B, T, H, 3D]."""
    B, T = qkv.shape[:2]
    return qkv.view(B, T, n_heads, 3, head_dim).transpose(2, 3).contiguous()


needs_kernel = pytest.mark.skipif(not kernel_available(), reason="no C compiler with OpenMP here: causal_attention "
                                  "falls back to SDPA (tested below)")


@needs_kernel
@pytest.mark.parametrize("B,T,H,D", [(2, 1, 3, 4), (2, 17, 5, 4), (3, 40, 16, 4), (1, 130, 2, 16), (2, 33, 3, 1)])
@pytest.mark.parametrize("layout", ["per_head", "qkv_major"])
def test_kernel_matches_float64_reference_in_value_and_gradient(B, T, H, D, layout):
    torch.manual_seed(T * 31 + D)
    qkv = 2.0 * torch.randn(B, T, H, 3 * D)
    grad_out = torch.randn(B, T, H, D)
    ref_out, (ref_grad,) = value_and_grads(lambda x: reference(x, H, D), (qkv.double(),), grad_out)
    if layout == "qkv_major":  # the same numbers as [B, T, 3, H, D]; the gradient is compared in that layout
        qkv, ref_grad = qkv_major(qkv, H, D), qkv_major(ref_grad, H, D)
    out, (grad,) = value_and_grads(lambda x: causal_attention(x, H, D), (qkv,), grad_out)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=2e-6 * ref_out.abs().max().item() + 1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=2e-6 * ref_grad.abs().max().item() + 1e-6)
    # And no further from the float64 truth than torch's own float32 SDPA is.
    sdpa_out, (sdpa_grad,) = value_and_grads(lambda x: _sdpa(x, H, D), (qkv,), grad_out)
    assert (out - ref_out).abs().max() <= 4 * (sdpa_out - ref_out).abs().max() + 1e-7
    assert (grad - ref_grad).abs().max() <= 4 * (sdpa_grad - ref_grad).abs().max() + 1e-7


def _sdpa(qkv: torch.Tensor, H: int, D: int) -> torch.Tensor:
    q, k, v = qkv.transpose(1, 2).split(D, dim=-1) if qkv.dim() == 4 else qkv.transpose(1, 3).unbind(2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


@needs_kernel
def test_kernel_is_stable_for_large_scores_and_reads_strided_input():
    """Scores of +-hundreds (exp would overflow without the max shift), and qkv as a non-contiguous view."""
    torch.manual_seed(0)
    B, T, H, D = 2, 24, 4, 4
    wide = 40.0 * torch.randn(B, T, H, 3 * D + 5)
    qkv = wide[..., :3 * D]  # strided: rows of 3D + 5
    assert not qkv.is_contiguous()
    grad_out = torch.randn(B, T, H, D)
    out, (grad,) = value_and_grads(lambda x: causal_attention(x, H, D), (qkv,), grad_out)
    ref_out, (ref_grad,) = value_and_grads(lambda x: reference(x, H, D), (qkv.double(),), grad_out)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-4 * ref_out.abs().max().item())
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-4 * ref_grad.abs().max().item())


@needs_kernel
def test_kernel_is_causal_and_propagates_nan_forward_only():
    """A NaN key at position j poisons exactly the outputs at positions >= j, as in IEEE arithmetic."""
    torch.manual_seed(0)
    B, T, H, D = 1, 20, 2, 4
    qkv = torch.randn(B, T, H, 3 * D)
    qkv[0, 7, 1, D] = float("nan")  # head 1's key at position 7
    out = causal_attention(qkv, H, D)
    assert torch.isnan(out[0, 7:, 1]).all()
    assert torch.isfinite(out[0, :7, 1]).all() and torch.isfinite(out[0, :, 0]).all()


@needs_kernel
def test_kernel_is_deterministic_and_independent_of_thread_count(monkeypatch):
    monkeypatch.setattr(attention, "MIN_WORK_PER_THREAD", 1)  # a small call split across threads all the same
    torch.manual_seed(0)
    qkv, grad_out = torch.randn(4, 50, 6, 12), torch.randn(4, 50, 6, 4)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            out, (grad,) = value_and_grads(lambda x: causal_attention(x, 6, 4), (qkv,), grad_out)
            results.append((out, grad))
    finally:
        torch.set_num_threads(threads)
    for out, grad in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(grad, results[0][1])


@pytest.mark.parametrize("case", ["float64", "bfloat16", "dropout", "compiling"])
def test_other_dtypes_dropout_and_torch_compile_take_sdpa(case, monkeypatch):
    """Inputs the kernel does not handle go to SDPA (the kernel is never called) and still give the right answer."""
    calls = []
    monkeypatch.setattr(attention._PackedAttentionCPU, "apply", lambda *a: calls.append(a))
    torch.manual_seed(0)
    qkv = torch.randn(2, 9, 3, 12)
    if case == "dropout":
        torch.manual_seed(5)
        out = causal_attention(qkv, 3, 4, dropout_p=0.5)
        torch.manual_seed(5)
        q, k, v = qkv.transpose(1, 2).split(4, dim=-1)
        expected = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5, is_causal=True).transpose(1, 2)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    elif case == "compiling":  # what torch.compile traces: SDPA, which it knows, not a ctypes call
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        torch.testing.assert_close(causal_attention(qkv, 3, 4).double(), reference(qkv, 3, 4), rtol=1e-5, atol=1e-6)
    else:
        dtype = getattr(torch, case)
        tol = 1e-12 if dtype == torch.float64 else 3e-2
        for x in (qkv, qkv_major(qkv, 3, 4)):  # both layouts
            out = causal_attention(x.to(dtype), 3, 4)
            assert out.dtype == dtype
            torch.testing.assert_close(out.double(), reference(qkv.to(dtype), 3, 4), rtol=tol, atol=tol)
    assert calls == []


def test_shape_errors_name_the_expected_layouts():
    for wrong in (torch.zeros(2, 5, 3, 9), torch.zeros(2, 5, 3, 2, 4)):
        with pytest.raises(ValueError, match=r"qkv \[B, T, 3, 12\] or \[B, T, 3, 3, 4\]"):
            causal_attention(wrong, 3, 4)


@needs_kernel
@pytest.mark.parametrize("kind", ["mu", "dense"])
def test_mu_and_dense_losses_and_gradients_match_with_the_kernel_switched_off(kind, monkeypatch):
    """A whole MU / dense-baseline train step's loss and every parameter gradient agree between kernel and SDPA."""
    from lmlab.mu import DenseConfig, DenseModel, MUConfig, MUModel

    torch.manual_seed(0)
    if kind == "mu":
        model = MUModel(MUConfig.preset("mu-sota", vocab_size=50, max_seq_len=24, n_layers=2))
    else:
        model = DenseModel(DenseConfig(vocab_size=50, max_seq_len=24, n_layers=2, width=66, n_heads=3))
    ids = torch.randint(0, 50, (3, 24))

    def loss_and_grads():
        model.zero_grad()
        loss = F.cross_entropy(model(ids)[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1))
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, grads = loss_and_grads()
    monkeypatch.setenv(DISABLE_ENV, "0")
    assert not kernel_available()
    sdpa_loss, sdpa_grads = loss_and_grads()
    assert loss == pytest.approx(sdpa_loss, rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, sdpa_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_without_a_compiler_it_warns_once_and_falls_back(tmp_path):
    """CC pointing nowhere, in a fresh cache: one RuntimeWarning naming the fix, then SDPA's results."""
    script = """
import warnings, torch
from lmlab.kernels import causal_attention, kernel_available
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    qkv = torch.randn(2, 9, 3, 12)
    out = causal_attention(qkv, 3, 4)
    causal_attention(qkv, 3, 4)
q, k, v = qkv.transpose(1, 2).split(4, dim=-1)
expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
assert torch.equal(out, expected) and not kernel_available()
"""
    [(category, message)] = warnings_without_compiler(script, tmp_path)
    assert category == "RuntimeWarning"
    assert "could not be built" in message and "C compiler" in message
    kernels = tmp_path / "kernels"
    assert not kernels.exists() or not list(kernels.iterdir())  # no half-written library left behind


def test_threads_follow_torch_and_skip_waking_a_thread_for_small_calls():
    """A call splits across torch's threads only with MIN_WORK_PER_THREAD multiply-adds each, and never across
    more threads than (batch, kv head) jobs; the rank-r kernel likewise by its multiply-adds."""
    from lmlab.kernels import lowrank

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        assert attention._threads(1, 40, 4, 4, 16) == 1  # one step of a tiny model: 102,400 multiply-adds
        assert attention._threads(8, 512, 4, 4, 64) == 4
        assert attention._threads(1, 512, 8, 2, 64) == 2  # two kv-head jobs
        assert lowrank._threads(lowrank.MIN_WORK_PER_THREAD - 1) == 1
        assert lowrank._threads(3 * lowrank.MIN_WORK_PER_THREAD) == 3
        assert lowrank._threads(100 * lowrank.MIN_WORK_PER_THREAD) == 4
        torch.set_num_threads(1)
        assert attention._threads(8, 512, 4, 4, 64) == 1 and lowrank._threads(1 << 30) == 1
    finally:
        torch.set_num_threads(threads)
