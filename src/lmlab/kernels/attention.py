"""Causal self-attention with a compiled CPU kernel: MU's block and cross-block attention, the dense baseline's,
and (through transformers' attention interface) the self-attention of Hugging Face models while lmlab trains them.

Two entry points, one kernel:

- `causal_attention(qkv, n_heads, head_dim)` takes a fused projection - `qkv [B, T, H, 3 * D]` (each head's q, k,
  v side by side, as MU's per-block projection writes them) or `[B, T, 3, H, D]` (nanoGPT's `Linear(C, 3 C)`) -
  and returns softmax(q k^T / sqrt(D) + causal mask) v as `[B, T, H, D]`.
- `hf_attention_forward`, registered with transformers as the attention implementation "lmlab" by
  `use_kernel_attention(model)` (or for a block by `kernel_attention(model)`, which `lmlab.engine.train` runs
  in): query `[B, H, T, D]`, key / value `[B, Hkv, T, D]` (grouped-query attention
  included), the model's own scaling. It takes the kernel only for plain causal self-attention - no attention
  mask (no padding), no cache (as many keys as queries), no dropout, softcap, sliding window, sinks or any other
  argument it does not know - and hands everything else to transformers' own SDPA attention unchanged.

Both equal `F.scaled_dot_product_attention(..., is_causal=True)` in value and gradient.

Where the kernel runs: for float32 tensors on the CPU, `causal_attention.c` (next to this file) - built on first
use with the machine's C compiler into the lmlab cache (`LMLAB_CACHE`, by default ~/.cache/lmlab) and loaded with
ctypes. Register-blocked over 8 queries x 16 keys, it is ~2.8x faster forward and backward than torch's CPU flash
kernel on heads of width 64 at 512 tokens ([4, 4, 512, 64], 2 threads: 9.9 ms vs 27.6 ms), 5x on MU's block heads
of width 4 and 2.2x on heads of width 22 (benchmarks/attention_kernel.py). Everywhere else (GPU, bf16 / float16
/ float64, dropout > 0, no compiler, `LMLAB_CPU_KERNELS=0`) and inside torch.compile it is
scaled_dot_product_attention, with the same results.

Threads: the kernel's OpenMP threads are torch's - the C library needs libgomp.so.1, which torch (a Linux pip
build) has already loaded, so the process holds one OpenMP runtime and one thread pool - up to
`torch.get_num_threads()` of them, and a call with less than `MIN_WORK_PER_THREAD` multiply-adds per thread runs on
fewer (a small call on one): waking a thread costs more than such a share of the work saves, above all on a machine
whose cores other processes keep busy. See lmlab.kernels.build for how idle threads wait.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from lmlab.kernels.build import disabled, load

HF_NAME = "lmlab"  # the attention implementation name registered with transformers
# Multiply-adds (B H T^2 D, about a forward's) each thread must get before the kernel splits a call across threads.
MIN_WORK_PER_THREAD = 1 << 18
# Keyword arguments transformers' attention layers pass that do not change what plain causal self-attention
# computes (checked below: dropout 0, is_causal not False, output_attentions off). Any other one that is not None
# (softcap, sliding_window, s_aux, position_bias, cache, cu_seq_lens_*, ...) sends the call to SDPA.
_HF_HARMLESS = frozenset({"dropout", "scaling", "is_causal", "position_ids", "use_cache", "output_attentions"})


def causal_attention(qkv: torch.Tensor, n_heads: int, head_dim: int, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention of each head over the sequence -> `[B, T, H, D]`, from a fused projection in either layout:

    - `[B, T, H, 3 * D]`: each head's q, k, v side by side (MU's per-block projection);
    - `[B, T, 3, H, D]`: all heads' q, then k, then v (a `Linear(C, 3 C)` output viewed so, as nanoGPT's).

    `dropout_p` is applied to the attention weights (as in SDPA), so pass 0 outside training.
    """
    per_head = (n_heads, 3 * head_dim)
    if not (qkv.dim() == 4 and tuple(qkv.shape[2:]) == per_head
            or qkv.dim() == 5 and tuple(qkv.shape[2:]) == (3, n_heads, head_dim)):
        raise ValueError(f"causal_attention takes qkv [B, T, {n_heads}, {3 * head_dim}] or [B, T, 3, {n_heads}, "
                         f"{head_dim}], got {tuple(qkv.shape)}")
    if dropout_p == 0.0 and _kernel_applies(qkv):
        return _PackedAttentionCPU.apply(qkv.contiguous(), n_heads, head_dim)
    q, k, v = (t.transpose(1, 2) for t in _split(qkv, n_heads, head_dim))  # [B, H, T, D] each
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True).transpose(1, 2)


def hf_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature (query [B, H, T, D], key / value [B, Hkv, S, D]) ->
    (attn_output [B, T, H, D], None). The kernel for plain causal self-attention (module doc), else SDPA."""
    if _plain_causal(module, query, key, value, attention_mask, kwargs):
        scale = kwargs.get("scaling")
        scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
        out = _AttentionCPU.apply(*(t.transpose(1, 2) for t in (query, key, value)), scale)
        return out, None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def use_kernel_attention(model: torch.nn.Module) -> str | None:
    """Switch a transformers model that uses SDPA (their default) to lmlab's attention ("lmlab",
    `hf_attention_forward`); returns the implementation it had, to pass back to `restore_attention`, or None when
    the model was left as it was: another implementation chosen (eager, flash attention, flex), a model that does
    not route its attention through transformers' attention interface, or `LMLAB_CPU_KERNELS=0`.

    Nothing is compiled here: the kernel is built at the first float32 CPU call (never on a GPU)."""
    if disabled():
        return None
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return None
    if not getattr(model, "_can_set_attn_implementation", lambda: True)():
        return None
    _register_hf()
    model.set_attn_implementation(HF_NAME)
    return "sdpa" if config._attn_implementation == HF_NAME else None


def restore_attention(model: torch.nn.Module, previous: str | None) -> None:
    """Undo `use_kernel_attention` (nothing when it returned None)."""
    if previous is not None and getattr(getattr(model, "config", None), "_attn_implementation", None) == HF_NAME:
        model.set_attn_implementation(previous)


@contextlib.contextmanager
def kernel_attention(model: torch.nn.Module) -> Iterator[list[torch.nn.Module]]:
    """Inside the block, every transformers model in `model` (itself or any submodule) that uses SDPA runs lmlab's
    attention (`use_kernel_attention`); afterwards each is back on its own. Yields the models switched."""
    switched = []
    try:
        for module in model.modules():  # outer models first: their inner models share the config, already switched
            previous = use_kernel_attention(module)
            if previous is not None:
                switched.append((module, previous))
        yield [module for module, _ in switched]
    finally:
        for module, previous in reversed(switched):
            restore_attention(module, previous)


@functools.cache
def _register_hf() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(HF_NAME, hf_attention_forward)
    AttentionMaskInterface.register(HF_NAME, sdpa_mask)  # masks built exactly as for SDPA (None without padding)


def _plain_causal(module, query, key, value, attention_mask, kwargs) -> bool:
    if attention_mask is not None or kwargs.get("dropout", 0.0) != 0.0 or kwargs.get("output_attentions"):
        return False
    if kwargs.get("is_causal") is False or not getattr(module, "is_causal", True):
        return False
    if any(arg is not None for name, arg in kwargs.items() if name not in _HF_HARMLESS):
        return False
    B, H, T, D = query.shape
    if key.dim() != 4 or key.shape != value.shape or key.shape[0] != B or key.shape[2] != T or key.shape[3] != D:
        return False
    return H % key.shape[1] == 0 and all(_kernel_applies(t) for t in (query, key, value))


def _kernel_applies(t: torch.Tensor) -> bool:
    return (t.device.type == "cpu" and t.dtype == torch.float32 and not torch.compiler.is_compiling()
            and kernel_available())


def kernel_available() -> bool:
    """Whether `causal_attention` runs the compiled CPU kernel for float32 CPU tensors (see the module doc)."""
    return not disabled() and _library() is not None


class _PackedAttentionCPU(torch.autograd.Function):
    """The kernel on a fused qkv as one autograd node: forward keeps (qkv, out, logsumexp), backward recomputes
    the weights and writes the gradient of qkv in one buffer.

    Plain autograd.Functions, not torch.library custom ops (torch >= 2.4): torch.compile never sees them, as both
    entry points take SDPA while compiling.
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
        out, lse = _forward(*_split(qkv, n_heads, head_dim), head_dim**-0.5)
        ctx.save_for_backward(qkv, out, lse)
        ctx.heads = (n_heads, head_dim)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        qkv, out, lse = ctx.saved_tensors
        grad_qkv = torch.empty_like(qkv)
        _backward(_split(qkv, *ctx.heads), out, grad_out, lse, _split(grad_qkv, *ctx.heads), ctx.heads[1] ** -0.5)
        return grad_qkv, None, None


class _AttentionCPU(torch.autograd.Function):
    """The kernel on separate q [B, T, H, D], k, v [B, T, Hkv, D] (any strides with the last one 1)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        out, lse = _forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        grads = tuple(torch.empty_like(t) for t in (q, k, v))  # q's strides when dense (HF: [B, H, T, D])
        _backward((q, k, v), out, grad_out, lse, grads, ctx.scale)
        return (*grads, None)


def _split(qkv: torch.Tensor, n_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views q, k, v [B, T, H, D] of a fused projection in either layout."""
    if qkv.dim() == 4:  # [B, T, H, 3D]
        return qkv.split(head_dim, dim=-1)
    return qkv.unbind(2)  # [B, T, 3, H, D]


def _strides(*tensors: torch.Tensor) -> ctypes.Array:
    """(batch, position, head) strides of [B, T, H, D] tensors, for the kernel."""
    values = [s for t in tensors for s in (t.stride(0), t.stride(1), t.stride(2))]
    return (ctypes.c_long * len(values))(*values)


def _forward(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, H, D = q.shape
    out, lse = q.new_empty(B, T, H, D), q.new_empty(B, H, T)
    _call(_library().lmlab_attention_forward, "forward", q, k, v, out, lse, B, T, H, k.shape[2], D,
          _strides(q, k, v), scale, _threads(B, T, H, k.shape[2], D))
    return out, lse


def _backward(qkv: tuple, out, grad_out, lse, grads: tuple, scale: float) -> None:
    q, k, v = qkv
    B, T, H, D = q.shape
    _call(_library().lmlab_attention_backward, "backward", q, k, v, out, grad_out.contiguous(), lse, *grads, B, T, H,
          k.shape[2], D, _strides(q, k, v, *grads), scale, _threads(B, T, H, k.shape[2], D))


def _threads(B: int, T: int, H: int, Hkv: int, D: int) -> int:
    """Threads for one call: torch's, at most one per (batch, kv head) job, and at least MIN_WORK_PER_THREAD
    multiply-adds each. The results do not depend on it (each job runs on one thread)."""
    work = B * H * T * T * D
    return max(1, min(torch.get_num_threads(), B * Hkv, work // max(1, MIN_WORK_PER_THREAD)))


def _call(fn, direction: str, *args) -> None:
    converted = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
    if fn(*converted) != 0:
        raise MemoryError(f"the CPU attention kernel could not allocate its work buffers ({direction})")


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernel, or None (with one warning) if it cannot be built here."""
    lib = load("causal_attention", "using torch's scaled_dot_product_attention instead (same results, slower on CPU "
                                   "for MU, its dense baseline and Hugging Face models lmlab trains)")
    if lib is not None:
        pointer, i32, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        geometry = [i32] * 5 + [pointer, f32, i32]  # B, T, H, Hkv, D, strides, scale, threads
        lib.lmlab_attention_forward.argtypes = [pointer] * 5 + geometry
        lib.lmlab_attention_backward.argtypes = [pointer] * 9 + geometry
        lib.lmlab_attention_forward.restype = lib.lmlab_attention_backward.restype = i32
    return lib
