"""The adapter layer: LoRA / rsLoRA / DoRA around a frozen `nn.Linear` or GPT-2 `Conv1D` (docs/hylorada.md s. 1, 3).

    LoRA: y = W0 x + b + s * B A dropout(x) * (1 + sigmoid(w) * tanh(bias[bucket(p)]))   (bias factor optional)
    DoRA: y = (m / ||W0 + s B A||_row) * (W0 x + s B A dropout(x) ...) + b               (norm detached)

Numerics match peft's LoRA/rsLoRA/DoRA for the same weights. The forward is kept lean because it runs
inside every attention projection: for a training batch without dropout or position factor the update is
merged into the weight (one GEMM with W0 + s B A forward and backward), otherwise the low-rank add is fused
into one GEMM (`addmm_`); the position factor scales the rank-r intermediate [N, r] rather than [N, out], and
the DoRA row norm is computed without forming B A and cached until A, B or W0 change. On the CPU in float32 the
rank-r products and merges run in lmlab.kernels.lowrank (the backward's three in one threaded pass).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from transformers.pytorch_utils import Conv1D

from lmlab.hylorada.config import HyLoRADAConfig
from lmlab.hylorada.position import PositionContext
from lmlab.kernels import lowrank

# DoRA's row norm reads the frozen W0 in the adapter's precision: a W0 stored in another dtype is cast this many
# elements at a time (16 MiB in float32), not whole - an 8B model's MLP projection would otherwise add a 235 MB copy
ROW_NORM_BLOCK = 1 << 22
_STEPS = [0]  # optimizer steps taken in this process (any torch optimizer): part of the DoRA norm's cache key


def _count_step(optimizer, args, kwargs) -> None:
    _STEPS[0] += 1


register_optimizer_step_post_hook(_count_step)


def trainable_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The dtype of HyLoRADA's trainable weights on a base of `base_dtype`: float32 on a half-precision base (bf16 /
    fp16 stay the frozen weights' dtype; AdamW's updates of rank-r factors need float32), else the base's."""
    return torch.float32 if base_dtype in (torch.bfloat16, torch.float16) else base_dtype


class HyLoRADALinear(nn.Module):
    """Wraps `base_layer` (kept frozen and untouched as `self.base_layer`) with a low-rank update. On a bf16 / fp16
    base the adapter's weights are float32 (`trainable_dtype`): the update runs in float32 and is added in the base's
    dtype, or all of it in the autocast dtype under autocast."""

    def __init__(self, base_layer: nn.Module, config: HyLoRADAConfig, context: PositionContext | None = None) -> None:
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, Conv1D)):
            raise TypeError(f"HyLoRADA wraps nn.Linear or Conv1D, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        # GPT-2's Conv1D stores its weight transposed: [in, out]
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        weight = base_layer.weight
        self.in_features, self.out_features = weight.shape if self.fan_in_fan_out else weight.shape[::-1]
        self.r = config.r
        self.scaling = config.scaling
        factory = {"dtype": trainable_dtype(weight.dtype), "device": weight.device}
        self.lora_A = nn.Parameter(torch.empty(config.r, self.in_features, **factory))  # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.r, **factory))  # [out, r]
        if config.init_a == "orthogonal":
            nn.init.orthogonal_(self.lora_A)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and peft
        # no dropout op at all when it would be the identity
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.position_gate = nn.Parameter(torch.zeros(1, **factory)) if config.position_bias else None
        self.context = context if config.position_bias else None
        self._w0_sq: tuple[tuple, torch.Tensor] | None = None  # (key, ||W0_i||^2) - W0 is frozen
        self._norm: tuple[tuple, torch.Tensor] | None = None  # (key, ||W_i||) for DoRA
        # DoRA magnitude m: [out], initialised to the row norms of W = W0 + s B A (= ||W0|| as B = 0)
        self.lora_magnitude = nn.Parameter(self.row_norm().clone()) if config.use_dora else None

    def weight_out_in(self) -> torch.Tensor:
        """W0 as [out, in] (a view, no copy)."""
        weight = self.base_layer.weight
        return weight.t() if self.fan_in_fan_out else weight

    def delta_weight(self) -> torch.Tensor:
        """s B A as [out, in]."""
        return self.scaling * (self.lora_B @ self.lora_A)

    @torch.no_grad()
    def row_norm(self) -> torch.Tensor:
        """||W0_i + s B_i A||, [out], without forming B A.

        ||W_i||^2 = ||W0_i||^2 + 2 s B_i . (A W0_i) + s^2 B_i (A A^T) B_i^T. Cached until A, B or W0
        change (tensor versions and storage) or an optimizer steps, so eval mode and gradient accumulation reuse
        it. (A fused optimizer, e.g. AdamW(fused=True), updates parameters without bumping their versions: before
        the step count was part of the key, DoRA trained on the norm of its first step.)
        """
        weight, a, b = self.base_layer.weight, self.lora_A, self.lora_B
        # tensor versions see in-place writes (copy_, load_state_dict, foreach optimizers); fused optimizers
        # write without a version bump, so every optimizer step also starts a new generation
        w_key = (weight.data_ptr(), weight._version, weight.dtype, _STEPS[0] if weight.requires_grad else 0)
        key = (w_key, a.data_ptr(), a._version, b.data_ptr(), b._version, _STEPS[0])
        if self._norm is not None and self._norm[0] == key:
            return self._norm[1]
        need_sq = self._w0_sq is None or self._w0_sq[0] != w_key
        w0 = self.weight_out_in()  # [out, in], a view
        if w0.dtype == a.dtype:
            a_w0 = a @ w0.t()  # [r, out]: column i is A W0_i
            w0_sq = w0.pow(2).sum(1) if need_sq else None
        else:
            # W0 stored in another dtype (a bf16 base under float32 adapters): cast to the adapter's precision a block
            # of rows at a time, so no float32 copy of the frozen weight exists beyond ROW_NORM_BLOCK elements
            a_w0 = torch.empty(a.shape[0], self.out_features, dtype=a.dtype, device=a.device)
            w0_sq = torch.empty(self.out_features, dtype=a.dtype, device=a.device) if need_sq else None
            step = max(1, ROW_NORM_BLOCK // self.in_features)
            for start in range(0, self.out_features, step):
                block = w0[start:start + step].to(a.dtype)
                a_w0[:, start:start + step] = a @ block.t()
                if w0_sq is not None:
                    w0_sq[start:start + step] = block.pow(2).sum(1)
        if need_sq:
            self._w0_sq = (w_key, w0_sq)
        cross = (b * a_w0.t()).sum(1)  # [out]
        quad = ((b @ (a @ a.t())) * b).sum(1)  # [out]
        s = self.scaling
        norm = (self._w0_sq[1] + 2 * s * cross + s * s * quad).clamp_min(0).sqrt()
        self._norm = (key, norm)
        return norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.base_layer.weight, self.base_layer.bias
        x2 = x.reshape(-1, self.in_features)  # [N, in]
        factor = None
        if self.position_gate is not None:
            # per-token factor (1 + sigmoid(w) tanh(bias[bucket(p)])), applied to the rank-r intermediate
            factor = 1 + torch.sigmoid(self.position_gate) * self.context.position_bias_term(x2.shape[0])  # [N, 1]
        magnitude = self.lora_magnitude
        norm = self.row_norm() if magnitude is not None else None
        fused = (
            x2.dtype == weight.dtype == self.lora_A.dtype
            and not weight.requires_grad
            and (bias is None or not bias.requires_grad)
            and not torch.is_autocast_enabled(x2.device.type)
        )
        if fused:
            p = self.dropout.p if self.dropout is not None and self.training else 0.0
            y = _LowRankUpdate.apply(
                x2, weight, bias, self.lora_A, self.lora_B, factor, magnitude, norm, self.scaling,
                self.fan_in_fan_out, p,
            )
        else:
            y = self._forward_autograd(x2, factor, norm)
        return y.view(*x.shape[:-1], self.out_features)

    def _forward_autograd(
        self, x2: torch.Tensor, factor: torch.Tensor | None, norm: torch.Tensor | None
    ) -> torch.Tensor:
        """The same update with plain autograd ops: for autocast, mixed dtypes or a trainable base layer.

        Under autocast the matmuls run in the autocast dtype and so does the output, as the wrapped layer's
        would (no casts back and forth); without it the adapter may have another dtype than the base (e.g.
        fp32 adapters on a bf16 base) and its update is cast to the base's dtype.
        """
        weight, bias = self.base_layer.weight, self.base_layer.bias
        lora_in = self.dropout(x2) if self.dropout is not None else x2
        if not torch.is_autocast_enabled(x2.device.type):
            lora_in = lora_in.to(self.lora_A.dtype)
        h = lora_in @ self.lora_A.t()  # [N, r]
        if factor is not None:
            h = h * factor
        update = h @ self.lora_B.t()  # [N, out]
        w = weight if self.fan_in_fan_out else weight.t()  # [in, out] (a view)
        if self.lora_magnitude is None:
            base = torch.addmm(bias, x2, w) if bias is not None else x2 @ w
            return base + self.scaling * update.to(base.dtype)
        base = x2 @ w
        # DoRA's row scale stays in the magnitude's precision and the product is rounded once: a scale rounded to
        # bf16 first (spacing 2^-8 near 1) would hide every change of the magnitude below about 0.4% from the
        # forward pass. The bias is not rescaled.
        g = self.lora_magnitude / norm
        y = (g * (base + self.scaling * update.to(base.dtype))).to(base.dtype)
        return y + bias.to(y.dtype) if bias is not None else y

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W0 + s B A, rescaled row-wise by m / ||W|| for DoRA, in the base layer's layout."""
        weight = self.weight_out_in() + self.delta_weight()  # [out, in]
        if self.lora_magnitude is not None:
            weight = weight * (self.lora_magnitude / self.row_norm()).unsqueeze(1)
        weight = weight.to(self.base_layer.weight.dtype)
        return weight.t().contiguous() if self.fan_in_fan_out else weight

    def extra_repr(self) -> str:
        kind = "dora" if self.lora_magnitude is not None else "lora"
        return f"{kind}, r={self.r}, scaling={self.scaling:.4g}, position_bias={self.position_gate is not None}"


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout mask shaped like `x`: True (keep) with probability 1 - p, independently per element.

    Why not `rand_like(x) >= p`: on CPU the random generator dominates dropout's cost. `random_()` on
    int64 gives 63 uniform bits per draw, so one draw serves four elements as 16-bit chunks: three
    uniform over int16, and the top chunk (sign bit always 0) uniform over [0, 32767], each compared
    with its own threshold. p is resolved to 1/32768.
    """
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()  # [0, 2^63)
    chunks = bits.view(torch.int16).view(-1, 4)  # little-endian: column 3 holds bits 48..62
    mask = chunks >= round(-32768 + p * 65536)
    mask[:, 3] = chunks[:, 3] >= round(p * 32768)
    return mask.view(-1)[:n].view_as(x)


class _LowRankUpdate(torch.autograd.Function):
    """The adapter's whole forward as one autograd node, with a hand-written backward.

    Why: one node instead of ~8 keeps per-layer overhead low, the update can be merged into the weight for the step
    (when N (in + out) > in out: an [out, in] GEMM instead of passes over [N, out] and [N, in]), and the backward
    can run the thin rank-r products its own way (float32 CPU: lmlab.kernels.lowrank, grad_B, grad_h and grad_A in
    one threaded pass over grad_y and x; elsewhere torch's matmuls in the layouts they are fastest in) and fuse the
    LoRA input gradient into the base one (a rank-r update of grad_x, or the merged weight). Dropout keeps an
    unscaled masked copy of x and applies 1/(1-p) to the rank-r intermediate instead of to [N, in]. DoRA's row scale
    g = m / ||W|| is folded into the weight and the rank-r factor rather than applied to [N, out] activations and
    gradients, and its magnitude gradient is read off the output. The base weight and bias are frozen here (the
    module falls back to plain autograd otherwise).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, factor, magnitude, norm, scaling, fan_in_fan_out, p):
        # x [N, in]; weight [out, in] ([in, out] for Conv1D); factor [N, 1] | None; magnitude, norm [out] | None
        keep_scale = 1.0 / (1.0 - p)
        b_t = lora_b.t().contiguous()  # [r, out]
        g = None
        if magnitude is not None:
            g = magnitude / norm  # DoRA's row scale; norm is a constant (DoRA s. 4.3), the bias is not rescaled
            b_t = b_t * g
        out_features, in_features = weight.shape[::-1] if fan_in_fan_out else weight.shape
        # Without dropout or a per-token factor the update is a fixed weight: y = (W0 + s B A) x, one GEMM, and
        # grad_x = grad_y (W0 + s B A) in backward, instead of two rank-r GEMMs that read and write [N, out] and
        # [N, in]. Worth it when forming the [out, in] weight costs less than those passes (N (in + out) > in out);
        # fp32 / fp64 only, so that s B A is not rounded away against W0 in a 16-bit weight.
        merged = (p == 0 and factor is None and weight.dtype in (torch.float32, torch.float64)
                  and x.shape[0] * (in_features + out_features) > in_features * out_features)
        kernel = lowrank.applies(x, weight, lora_a, lora_b, rank=lora_a.shape[0])
        mask, lora_in = None, x
        if not merged and p > 0:
            mask = keep_mask(x, p)
            lora_in = torch.mul(x, mask)
        need_h0 = not merged or ctx.needs_input_grad[4]  # merged: only lora_b's gradient needs h0
        if kernel:  # h0 = keep_scale x A^T and the merged weight in one parallel region (lmlab.kernels.lowrank)
            update = lowrank.merge(weight, lora_a, lora_b, scaling, fan_in_fan_out) if merged else None
            h0 = lowrank.rows(lora_in, lora_a, keep_scale, update, need=need_h0)
            w = update.out if merged else weight
        else:
            # the rank-r intermediates are computed transposed, [r, N] = A x^T, and used as [N, r] views: on CPU
            # the thin GEMM is up to 2x faster in this orientation (x is read once along its rows)
            h0 = None
            if need_h0:
                h0 = lora_a @ lora_in.t()  # [r, N]
                h0 = (h0.mul_(keep_scale) if mask is not None else h0).t()
            w = _merge(weight, lora_a, lora_b, scaling, fan_in_fan_out) if merged else weight
        h = h0 * factor if factor is not None else h0
        # y = g (.) (W0 x + s B h) + bias, with g folded into the [out, in] and [out, r] factors, not into [N, out]
        y = _linear(x, w, bias, fan_in_fan_out, g)  # [N, out]
        if not merged and kernel:
            lowrank.update(lowrank.Update(y, h, b_t, scaling, out=y))
        elif not merged:
            y.addmm_(h, b_t, alpha=scaling)
        # DoRA's magnitude gradient needs W0 x + s B h = (y - bias) / g: keep y rather than a second [N, out]
        saved_y = y if magnitude is not None and magnitude.requires_grad else None
        ctx.save_for_backward(lora_in, mask, h0, h, factor, weight, lora_a, lora_b, b_t, saved_y, g, magnitude, bias)
        ctx.scaling, ctx.fan_in_fan_out, ctx.keep_scale, ctx.merged = scaling, fan_in_fan_out, keep_scale, merged
        ctx.kernel = kernel
        return y

    @staticmethod
    def backward(ctx, grad_y):
        saved = ctx.saved_tensors  # unpacked once: each access re-checks every saved tensor's version
        lora_in, mask, h0, h, factor, weight, lora_a, lora_b, b_t, y, g, magnitude, bias = saved
        need_x, _, _, need_a, need_b, need_factor, need_magnitude = ctx.needs_input_grad[:7]
        s = ctx.scaling
        grad_magnitude = None
        if need_magnitude:
            # d y / d m = (W0 x + s B h) / ||W|| = (y - bias) / m
            projected = (grad_y * y).sum(0)  # [out]
            if bias is not None:
                projected -= bias * grad_y.sum(0)
            grad_magnitude = projected / magnitude
        if ctx.kernel:
            grad_x, grad_a, grad_b, grad_factor = _backward_kernel(ctx, saved, grad_y, need_x, need_a, need_b,
                                                                   need_factor)
            return grad_x, None, None, grad_a, grad_b, grad_factor, grad_magnitude, None, None, None, None
        grad_b = None
        if need_b:
            grad_b = h.t() @ grad_y  # [r, out]
            if g is not None:
                grad_b *= g
            grad_b = grad_b.mul_(s).t()  # [out, r]
        grad_a = grad_factor = grad_x = None
        if need_a or need_factor or (need_x and not ctx.merged):
            grad_h = (b_t @ grad_y.t()).mul_(s).t()  # [N, r] (computed as [r, N], as h0); b_t already carries g
            grad_factor = (grad_h * h0).sum(-1, keepdim=True) if need_factor else None  # [N, 1]
            grad_h0 = grad_h * factor if factor is not None else grad_h
            if mask is not None:
                grad_h0 = grad_h0 * ctx.keep_scale
            grad_a = grad_h0.t() @ lora_in if need_a else None  # [r, in]
        if need_x:
            # merged: W0 + s B A (formed again rather than kept: one weight-sized temporary at a time, not one per
            # adapted layer until backward) already carries the update's share of the input gradient
            if ctx.merged:
                weight = _merge(weight, lora_a, lora_b, s, ctx.fan_in_fan_out)
            grad_x = _input_grad(grad_y, weight, ctx.fan_in_fan_out, g)  # [N, in]
            if not ctx.merged and mask is None:
                grad_x.addmm_(grad_h0, lora_a)
            elif not ctx.merged:
                grad_x.addcmul_(grad_h0 @ lora_a, mask)
        return grad_x, None, None, grad_a, grad_b, grad_factor, grad_magnitude, None, None, None, None


def _backward_kernel(ctx, saved: tuple, grad_y, need_x: bool, need_a: bool, need_b: bool, need_factor: bool) -> tuple:
    """`_LowRankUpdate.backward`'s products with lmlab.kernels.lowrank: grad_B, grad_h, grad_A (and the merged
    weight for grad_x) in one parallel region, from the node's saved tensors `saved`; returns (grad_x, grad_A,
    grad_B, grad_factor)."""
    lora_in, mask, h0, h, factor, weight, lora_a, lora_b, b_t, _, g, _, _ = saved
    s, fan_in_fan_out = ctx.scaling, ctx.fan_in_fan_out
    update = lowrank.merge(weight, lora_a, lora_b, s, fan_in_fan_out) if need_x and ctx.merged else None
    need_h0 = need_x and not ctx.merged
    grad_b, grad_a, grad_h0, grad_factor = lowrank.backward(
        grad_y, lora_in, h, b_t, s, need_b=need_b, need_a=need_a, need_h0=need_h0, g=g, factor=factor, h0=h0,
        need_factor=need_factor, keep=ctx.keep_scale if mask is not None else 1.0, update=update)
    grad_x = None
    if need_x:
        grad_x = _input_grad(grad_y, update.out if ctx.merged else weight, fan_in_fan_out, g)  # [N, in]
        if need_h0 and mask is None:
            lowrank.update(lowrank.Update(grad_x, grad_h0, lora_a, 1.0, out=grad_x))
        elif need_h0:
            grad_x.addcmul_(grad_h0 @ lora_a, mask)
    return grad_x, grad_a, grad_b, grad_factor


def _merge(weight, lora_a, lora_b, scaling: float, fan_in_fan_out: bool) -> torch.Tensor:
    """W0 + s B A in the base weight's layout ([in, out] for Conv1D)."""
    if fan_in_fan_out:
        return torch.addmm(weight, lora_a.t(), lora_b.t(), alpha=scaling)
    return torch.addmm(weight, lora_b, lora_a, alpha=scaling)


def _linear(x, weight, bias, fan_in_fan_out: bool, g: torch.Tensor | None) -> torch.Tensor:
    """g (.) (W0 x) + bias for x [N, in], scaling whichever is smaller: W0 ([in, out]) or the output ([N, out])."""
    if g is not None and x.shape[0] >= weight.shape[0 if fan_in_fan_out else 1]:
        weight = weight * g if fan_in_fan_out else weight * g.unsqueeze(1)
        g = None
    if fan_in_fan_out:
        y = torch.addmm(bias, x, weight) if bias is not None and g is None else x @ weight
    else:
        y = F.linear(x, weight, bias if g is None else None)
    if g is None:
        return y
    return torch.addcmul(bias, y, g) if bias is not None else y.mul_(g)


def _input_grad(grad_y, weight, fan_in_fan_out: bool, g: torch.Tensor | None) -> torch.Tensor:
    """(grad_y (.) g) W0 as [N, in], scaling whichever is smaller: W0 or grad_y ([N, out])."""
    if g is not None:
        if grad_y.shape[0] >= weight.shape[0 if fan_in_fan_out else 1]:
            weight = weight * g if fan_in_fan_out else weight * g.unsqueeze(1)
        else:
            grad_y = grad_y * g
    return grad_y @ weight.t() if fan_in_fan_out else grad_y @ weight
