"""The adapter's rank-r CPU kernel (lmlab.kernels.lowrank) against float64 closed forms and against the layer's own
torch path run in float64: products, weight merges, and whole forward/backward passes of `_LowRankUpdate` (LoRA,
DoRA, the position factor, dropout; Linear and Conv1D layouts; ranks and widths that are not multiples of the
kernel's blocks)."""

from __future__ import annotations

import pytest
import torch

from helpers import warnings_without_compiler
from lmlab.hylorada import layers
from lmlab.kernels import lowrank

needs_kernel = pytest.mark.skipif(not lowrank.applies(torch.zeros(1), rank=1), reason="no C compiler for the kernel")


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request, monkeypatch):
    monkeypatch.setattr(lowrank, "MIN_WORK_PER_THREAD", 1)  # the test shapes are small: split them all the same
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def close(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    """float32 against a float64 reference, relative to the reference's scale."""
    scale = expected.abs().max().item() + 1e-30
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=2e-5 * scale, msg=msg)


SHAPES = [(1, 5, 3, 1), (7, 16, 17, 3), (9, 33, 50, 8), (130, 67, 48, 12), (64, 40, 96, 17), (33, 256, 20, 4)]


@needs_kernel
@pytest.mark.parametrize("n,k_in,k_out,r", SHAPES)
def test_products_match_float64(threads, n, k_in, k_out, r):
    g = torch.Generator().manual_seed(n * 1000 + r)
    x, gy = torch.randn(n, k_in, generator=g), torch.randn(n, k_out, generator=g)
    a, bt = torch.randn(r, k_in, generator=g), torch.randn(r, k_out, generator=g)
    h, h0 = torch.randn(n, r, generator=g), torch.randn(n, r, generator=g)
    factor, scale = torch.rand(n, 1, generator=g) + 0.5, torch.rand(k_out, generator=g) + 0.5
    s, keep = 1.7, 1.25
    xd, gyd, ad, btd, hd, h0d = (t.double() for t in (x, gy, a, bt, h, h0))

    close(lowrank.rows(x, a, 0.5), 0.5 * xd @ ad.t(), "h0")
    grad_b, grad_a, grad_h0, grad_factor = lowrank.backward(
        gy, x, h, bt, s, need_b=True, need_a=True, need_h0=True, g=scale, factor=factor, h0=h0, need_factor=True,
        keep=keep)
    grad_h = s * gyd @ btd.t()
    close(grad_b, s * scale.double()[:, None] * (gyd.t() @ hd), "grad_B")
    close(grad_factor, (grad_h * h0d).sum(-1, keepdim=True), "grad_factor")
    expected_h0 = grad_h * factor.double() * keep
    close(grad_h0, expected_h0, "grad_h0")
    close(grad_a, expected_h0.t() @ xd, "grad_A")
    # each output alone, and none at all
    only_b = lowrank.backward(gy, x, h, bt, s, need_b=True, need_a=False)
    assert only_b[1:] == (None, None, None)
    torch.testing.assert_close(only_b[0], lowrank.backward(gy, x, h, bt, s, need_b=True, need_a=True)[0])
    only_a = lowrank.backward(gy, x, None, bt, s, need_b=False, need_a=True)
    close(only_a[1], grad_h.t() @ xd, "grad_A without factor")
    assert lowrank.backward(gy, x, h, bt, s, need_b=False, need_a=False) == (None, None, None, None)


@needs_kernel
@pytest.mark.parametrize("n,k_in,k_out,r", SHAPES)
def test_rank_updates_match_float64(threads, n, k_in, k_out, r):
    g = torch.Generator().manual_seed(r)
    w, a = torch.randn(k_out, k_in, generator=g), torch.randn(r, k_in, generator=g)
    b = torch.randn(k_out, r, generator=g)
    expected = w.double() + 0.3 * b.double() @ a.double()
    close(lowrank.update(lowrank.merge(w, a, b, 0.3, fan_in_fan_out=False)), expected, "Linear layout")
    conv = w.t().contiguous()
    close(lowrank.update(lowrank.merge(conv, a, b, 0.3, fan_in_fan_out=True)), expected.t(), "Conv1D layout")
    y, p = torch.randn(n, k_out, generator=g), torch.randn(n, r, generator=g)
    expected = y.double() + 2.0 * p.double() @ b.double().t()
    assert lowrank.update(lowrank.Update(y, p, b.t(), 2.0, out=y)) is y  # in place, Q given as a strided view
    close(y, expected, "in place")
    # merge and product in one call, with strided rows (a slice of a wider activation)
    wide = torch.randn(n, k_in + 5, generator=g)
    x = wide[:, 2:2 + k_in]
    update = lowrank.merge(w, a, b, 0.3, fan_in_fan_out=False)
    close(lowrank.rows(x, a, 1.0, update), x.double() @ a.double().t(), "strided rows")
    close(update.out, w.double() + 0.3 * b.double() @ a.double(), "merge in the same call")


@needs_kernel
def test_nan_and_inf_propagate():
    x, a = torch.ones(9, 20), torch.ones(2, 20)
    x[3, 7] = float("nan")
    x[5, 0] = float("inf")
    h = lowrank.rows(x, a)
    assert h[3].isnan().all() and h[5].isinf().all() and h[[0, 1, 2, 4, 6, 7, 8]].eq(20).all()


def _inputs(fan_in_fan_out: bool, n: int, k_in: int, k_out: int, r: int, dora: bool, with_factor: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(k_out, k_in, generator=g) / k_in**0.5
    if fan_in_fan_out:
        weight = weight.t().contiguous()
    values = {
        "x": torch.randn(n, k_in, generator=g),
        "weight": weight,
        "bias": torch.randn(k_out, generator=g),
        "lora_a": torch.randn(r, k_in, generator=g) / k_in**0.5,
        "lora_b": torch.randn(k_out, r, generator=g),
        "factor": torch.rand(n, 1, generator=g) + 0.5 if with_factor else None,
        "magnitude": torch.rand(k_out, generator=g) + 0.5 if dora else None,
        "norm": torch.rand(k_out, generator=g) + 1.0 if dora else None,
    }
    trainable = ["x", "lora_a", "lora_b", "factor", "magnitude"]
    return {k: (v.requires_grad_(k in trainable) if v is not None else None) for k, v in values.items()}


def _run(inputs: dict, dtype: torch.dtype, scaling: float, fan_in_fan_out: bool, p: float, seed: int):
    leaves = {k: (v.detach().to(dtype).requires_grad_(v.requires_grad) if v is not None else None)
              for k, v in inputs.items()}
    torch.manual_seed(seed)  # the same dropout mask in both precisions
    y = layers._LowRankUpdate.apply(*leaves.values(), scaling, fan_in_fan_out, p)
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    (y * weights).sum().backward()
    grads = {k: v.grad for k, v in leaves.items() if v is not None and v.requires_grad}
    return y, grads


CASES = {  # name: (n, in, out, r, dora, factor, dropout); n (in + out) > in out takes the merged-weight path
    "lora-merged": (96, 24, 40, 8, False, False, 0.0),
    "lora-unmerged": (5, 24, 40, 8, False, False, 0.0),
    "dora-merged": (96, 40, 24, 3, True, False, 0.0),
    "dora-unmerged": (6, 40, 24, 3, True, False, 0.0),
    "position-factor": (70, 33, 18, 12, False, True, 0.0),
    "dora-factor": (70, 18, 33, 5, True, True, 0.0),
    "dropout": (64, 32, 20, 4, False, False, 0.3),
    "dropout-factor": (64, 32, 20, 4, False, True, 0.3),
}


@needs_kernel
@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["Linear", "Conv1D"])
@pytest.mark.parametrize("case", CASES)
def test_layer_step_matches_its_float64_torch_path(monkeypatch, threads, case, fan_in_fan_out):
    """The whole adapter node on the kernel (float32) against the same node in float64, where the kernel does not
    apply and torch's matmuls run: output and every gradient."""
    n, k_in, k_out, r, dora, with_factor, p = CASES[case]
    calls = []
    original = lowrank.backward
    monkeypatch.setattr(lowrank, "backward", lambda *a, **k: calls.append(1) or original(*a, **k))
    inputs = _inputs(fan_in_fan_out, n, k_in, k_out, r, dora, with_factor, seed=n + r)
    y, grads = _run(inputs, torch.float32, 0.7, fan_in_fan_out, p, seed=5)
    assert calls, "the float32 CPU step did not run the kernel"
    calls.clear()
    y64, grads64 = _run(inputs, torch.float64, 0.7, fan_in_fan_out, p, seed=5)
    assert not calls
    close(y, y64, "y")
    assert grads.keys() == grads64.keys()
    for name in grads:
        close(grads[name], grads64[name], name)


def test_kernel_is_skipped_when_it_does_not_apply(monkeypatch):
    assert not lowrank.applies(torch.zeros(1), rank=lowrank.MAX_RANK + 1)
    assert not lowrank.applies(torch.zeros(1, dtype=torch.float64), rank=8)
    monkeypatch.setenv("LMLAB_CPU_KERNELS", "0")
    assert not lowrank.applies(torch.zeros(1), rank=8)


def test_without_a_compiler_adapters_warn_once_and_use_torch(tmp_path):
    """CC pointing nowhere, in a fresh cache: one RuntimeWarning naming lowrank.c and the fix, then torch's
    products, equal to the closed form."""
    script = """
import warnings, torch
from torch import nn
from lmlab.hylorada import HyLoRADAConfig
from lmlab.hylorada.layers import HyLoRADALinear
torch.manual_seed(0)
layer = HyLoRADALinear(nn.Linear(12, 10).requires_grad_(False),
                       HyLoRADAConfig(r=4, alpha=8, dropout=0.0, position_bias=False, landmarks="none",
                                      target_modules=["x"]))
nn.init.normal_(layer.lora_B)
x = torch.randn(40, 12)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y = layer(x)
    y.sum().backward()
    layer(x)
d = lambda t: t.detach().double()
base = d(x) @ d(layer.base_layer.weight).t() + d(layer.base_layer.bias)
expected = base + layer.scaling * d(x) @ d(layer.lora_A).t() @ d(layer.lora_B).t()
assert torch.allclose(d(y), expected, atol=1e-5), (y - expected).abs().max()
grad_a = layer.scaling * d(layer.lora_B).sum(0)[:, None] * d(x).sum(0)[None, :]  # d sum(y) / dA = s B^T 1 1^T x
assert torch.allclose(d(layer.lora_A.grad), grad_a, atol=1e-4)
"""
    [(category, message)] = warnings_without_compiler(script, tmp_path)
    assert category == "RuntimeWarning"
    assert "lowrank.c could not be built" in message and "C compiler" in message and "torch's matmuls" in message


@needs_kernel
def test_shapes_that_do_not_fit_are_refused_before_the_kernel_reads_them():
    x, gy, a, bt = torch.zeros(6, 5), torch.zeros(6, 7), torch.zeros(3, 5), torch.zeros(3, 7)
    with pytest.raises(ValueError, match="do not fit"):
        lowrank.rows(x, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="do not fit"):
        lowrank.Update(torch.zeros(7, 5), torch.zeros(7, 3), torch.zeros(3, 4), 1.0)
    with pytest.raises(ValueError, match="bt has shape"):
        lowrank.backward(gy, x, torch.zeros(6, 3), torch.zeros(3, 8), 1.0, need_b=True, need_a=True)
    with pytest.raises(ValueError, match="h has shape"):
        lowrank.backward(gy, x, torch.zeros(5, 3), bt, 1.0, need_b=True, need_a=True)
    with pytest.raises(ValueError, match="grad_B needs h"):
        lowrank.backward(gy, x, None, bt, 1.0, need_b=True, need_a=False)
    with pytest.raises(ValueError, match="factor"):
        lowrank.backward(gy, x, None, bt, 1.0, need_b=False, need_a=True, need_factor=True)
    assert lowrank.rows(x, a).shape == (6, 3)
