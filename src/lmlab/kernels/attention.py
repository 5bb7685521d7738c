"""Causal self-attention with a compiled CPU kernel for small heads (MU's block and cross-block attention, and
the dense baseline's, which shares the cross-block module).

`causal_attention(qkv, n_heads, head_dim)` takes the fused projection - `qkv [B, T, H, 3 * D]` (each head's q, k,
v side by side, as MU's per-block projection writes them) or `[B, T, 3, H, D]` (nanoGPT's `Linear(C, 3 C)`) -
and returns softmax(q k^T / sqrt(D) + causal mask) v as `[B, T, H, D]`. It equals
`F.scaled_dot_product_attention(..., is_causal=True)` in value and gradient.

Where it runs: for float32 tensors on the CPU without attention dropout, `causal_attention.c` (next to this
file) - built on first use with the machine's C compiler into the lmlab cache (`LMLAB_CACHE`, by default
~/.cache/lmlab) and loaded with ctypes. With heads of width 4, torch's CPU flash kernel spends its time in
tile GEMMs whose inner dimension is 4; the kernel here is ~3.5x faster forward and backward on MU's block
heads ([16, 16, 128, 4], 2 threads) and ~1.5x on heads of width 16-22 at 128 tokens (MU's cross-block and the
dense baseline's attention). Everywhere else (GPU, bf16 / float16 / float64, dropout > 0, no compiler,
`LMLAB_CPU_KERNELS=0`) and inside torch.compile it is `F.scaled_dot_product_attention`, with the same results.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("causal_attention.c")
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC")
DISABLE_ENV = "LMLAB_CPU_KERNELS"


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
    if (dropout_p == 0.0 and qkv.device.type == "cpu" and qkv.dtype == torch.float32
            and not torch.compiler.is_compiling() and kernel_available()):
        return _CausalAttentionCPU.apply(qkv.contiguous(), n_heads, head_dim)
    if qkv.dim() == 4:
        q, k, v = qkv.transpose(1, 2).split(head_dim, dim=-1)  # [B, H, T, D] each
    else:
        q, k, v = qkv.transpose(1, 3).unbind(2)  # [B, H, T, D] each
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True).transpose(1, 2)


def kernel_available() -> bool:
    """Whether `causal_attention` runs the compiled CPU kernel for float32 CPU tensors (see the module doc)."""
    if os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return _library() is not None


class _CausalAttentionCPU(torch.autograd.Function):
    """The kernel as one autograd node: forward keeps (qkv, out, logsumexp), backward recomputes the weights.

    A plain autograd.Function, not a torch.library custom op (torch >= 2.4): torch.compile never sees it, as
    `causal_attention` takes SDPA while compiling.
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
        B, T = qkv.shape[:2]
        out, lse = qkv.new_empty(B, T, n_heads, head_dim), qkv.new_empty(B, n_heads, T)
        _call("forward", qkv, out, lse, *_geometry(qkv, n_heads, head_dim))
        ctx.save_for_backward(qkv, out, lse)
        ctx.heads = (n_heads, head_dim)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        qkv, out, lse = ctx.saved_tensors
        grad_qkv = torch.empty_like(qkv)
        _call("backward", qkv, out, grad_out.contiguous(), lse, grad_qkv, *_geometry(qkv, *ctx.heads))
        return grad_qkv, None, None


def _geometry(qkv: torch.Tensor, n_heads: int, head_dim: int) -> tuple:
    """B, T, H, D, the strides of batch / position / head, the offsets of k and v from q, scale, threads."""
    B, T = qkv.shape[:2]
    if qkv.dim() == 4:  # [B, T, H, 3D]
        head, k_offset = qkv.stride(2), head_dim
    else:  # [B, T, 3, H, D]
        head, k_offset = qkv.stride(3), qkv.stride(2)
    return (B, T, n_heads, head_dim, qkv.stride(0), qkv.stride(1), head, k_offset, 2 * k_offset, head_dim**-0.5,
            torch.get_num_threads())


def _call(direction: str, *args) -> None:
    lib = _library()
    fn = lib.lmlab_causal_attention_forward if direction == "forward" else lib.lmlab_causal_attention_backward
    converted = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
    if fn(*converted) != 0:
        raise MemoryError(f"the CPU attention kernel could not allocate its work buffers ({direction})")


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernel (built once per source, compiler and CPU), or None with one warning if it cannot be
    built here."""
    try:
        path = _build()
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as exc:
        warnings.warn(f"lmlab: the CPU attention kernel could not be built or loaded ({exc}); using torch's "
                      f"scaled_dot_product_attention instead (same results, slower for MU and its dense baseline on "
                      f"CPU). To build it, install a C compiler with OpenMP (e.g. gcc) or point CC at one; to skip "
                      f"it without this warning, set {DISABLE_ENV}=0.", RuntimeWarning, stacklevel=3)
        return None
    pointer, i32, i64, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
    geometry = [i32, i32, i32, i32, i64, i64, i64, i64, i64, f32, i32]
    lib.lmlab_causal_attention_forward.argtypes = [pointer] * 3 + geometry
    lib.lmlab_causal_attention_backward.argtypes = [pointer] * 5 + geometry
    lib.lmlab_causal_attention_forward.restype = lib.lmlab_causal_attention_backward.restype = i32
    return lib


def _build() -> Path:
    from lmlab.fileio import atomic_path, cache_root

    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise OSError("no C compiler found (cc, gcc or $CC)")
    # -march=native: the library is only valid on this kind of CPU, so the CPU is part of its name.
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), compiler, *FLAGS, platform.machine(), _cpu_flags()]).encode()
    ).hexdigest()[:16]
    target = cache_root() / "kernels" / f"causal_attention-{key}.so"
    if not target.exists():
        with atomic_path(target) as tmp:  # concurrent builders (test workers) each rename a whole file into place
            result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(tmp)], capture_output=True,
                                    text=True, timeout=120)
            if result.returncode != 0:
                last = (result.stderr.strip().splitlines() or ["no output"])[-1]
                raise OSError(f"{compiler} exited with {result.returncode}: {last}")
    return target


def _cpu_flags() -> str:
    """The first CPU's model name and instruction-set flags, as /proc/cpuinfo lists them (Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return platform.processor()
    return "\n".join(line for line in text.splitlines() if line.startswith(("model name", "flags", "Features")))
