"""The thin rank-r products of an adapter's step on the CPU (`lowrank.c`), for `lmlab.hylorada.layers`.

A rank-8 product such as h = x A^T reads a whole [N, in] activation to write 8 columns: the BLAS runs it on one
core, far below its GEMM speed, and a LoRA step has four of them per adapted layer plus two weight merges. The
kernel runs the backward's three (grad_B, grad_h, grad_A) as one pass over the rows of grad_y and x, split across
threads, and each merge W0 + s B A in the same parallel region as the product next to it. Forward and backward of
an adapted GPT-2 / Llama projection at 2048 tokens: see benchmarks/lowrank_kernel.py.

`applies(...)` says when it runs (float32 CPU tensors, rank <= 64, not while torch.compile traces, the kernel
built, `LMLAB_CPU_KERNELS` not 0); otherwise the layer runs the same products with torch ops. Results equal
torch's up to float32 rounding (the sums run in another order).

Threads: torch's OpenMP threads (see lmlab.kernels.attention), up to `torch.get_num_threads()`, with at least
`MIN_WORK_PER_THREAD` multiply-adds each: a smaller call runs on fewer threads (a small one on one).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from lmlab.kernels.build import disabled, load

MAX_RANK = 64  # the kernel keeps a block's grad_h [8, r] on the stack
# Multiply-adds each thread must get before a call is split across threads (below it, waking a thread costs more
# than it saves).
MIN_WORK_PER_THREAD = 1 << 18

_P, _L, _I, _F = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float


class _Update(ctypes.Structure):
    """C `update_t`: out = w + s P Q."""

    _fields_ = [("w", _P), ("p", _P), ("q", _P), ("out", _P), ("ldw", _L), ("ldo", _L), ("prs", _L), ("pcs", _L),
                ("rows", _I), ("cols", _I), ("r", _I), ("s", _F)]


class _Backward(ctypes.Structure):
    """C `backward_t`."""

    _fields_ = [("gy", _P), ("x", _P), ("h", _P), ("h0", _P), ("bt", _P), ("g", _P), ("factor", _P),
                ("grad_b", _P), ("grad_a", _P), ("grad_h0", _P), ("grad_factor", _P), ("ldg", _L), ("ldx", _L),
                ("N", _L), ("in_", _I), ("out", _I), ("r", _I), ("s", _F), ("keep", _F)]


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = load("lowrank", "lmlab's adapters use torch's matmuls for their rank-r products instead (same results, "
                          "slower on CPU)")
    if lib is not None:
        update_p, backward_p = ctypes.POINTER(_Update), ctypes.POINTER(_Backward)
        lib.lmlab_lowrank_rows.argtypes = [_P, _L, _L, _I, _P, _I, _F, _P, update_p, _I]
        lib.lmlab_lowrank_update.argtypes = [update_p, _I]
        lib.lmlab_lowrank_backward.argtypes = [backward_p, update_p, _I]
        for fn in (lib.lmlab_lowrank_rows, lib.lmlab_lowrank_update, lib.lmlab_lowrank_backward):
            fn.restype = _I
    return lib


def applies(*tensors: torch.Tensor, rank: int) -> bool:
    """Whether the kernel serves these tensors (float32 on the CPU) at this rank."""
    return (rank <= MAX_RANK and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not torch.compiler.is_compiling() and not disabled() and _library() is not None)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """`t` as a matrix whose rows are contiguous (any row stride)."""
    return t if t.stride(-1) == 1 else t.contiguous()


class Update:
    """A rank-r update out = w + s P Q of a matrix (w and out [rows, cols], P [rows, r], Q [r, cols]); `out` may be
    `w` (in place). Keeps its tensors alive until the kernel has run."""

    def __init__(self, w: torch.Tensor, p: torch.Tensor, q: torch.Tensor, s: float,
                 out: torch.Tensor | None = None) -> None:
        self.w, self.p, self.q = _rows(w), p, q.contiguous()
        self.out = torch.empty_like(self.w, memory_format=torch.contiguous_format) if out is None else out
        if self.out.stride(-1) != 1:
            raise ValueError("the output of a rank-r update needs contiguous rows")
        rows, cols = self.w.shape
        if p.shape != (rows, self.q.shape[0]) or self.q.shape[1] != cols or self.out.shape != self.w.shape:
            raise ValueError(f"rank-r update of shapes that do not fit: w {tuple(w.shape)}, P {tuple(p.shape)}, "
                             f"Q {tuple(q.shape)}, out {tuple(self.out.shape)}")
        self.struct = _Update(self.w.data_ptr(), p.data_ptr(), self.q.data_ptr(), self.out.data_ptr(),
                              self.w.stride(0), self.out.stride(0), p.stride(0), p.stride(1), rows, cols, p.shape[1],
                              s)


def merge(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
          fan_in_fan_out: bool) -> Update:
    """W0 + s B A in the base weight's layout ([in, out] for GPT-2's Conv1D), as an update to run."""
    if fan_in_fan_out:  # [in, out] + s A^T B^T
        return Update(weight, lora_a.t(), lora_b.t(), scaling)
    return Update(weight, lora_b, lora_a, scaling)


def rows(x: torch.Tensor, matrix: torch.Tensor, scale: float = 1.0, update: Update | None = None,
         need: bool = True) -> torch.Tensor | None:
    """scale * x M^T as [N, r] (x [N, K], M [r, K]), None if not `need`; runs `update` in the same call."""
    x, matrix = _rows(x), matrix.contiguous()
    n, k = x.shape
    if matrix.shape[1] != k:
        raise ValueError(f"x {tuple(x.shape)} and M {tuple(matrix.shape)} do not fit")
    h = x.new_empty(n, matrix.shape[0]) if need else None
    work = (n * k * matrix.shape[0] if need else 0) + _work(update)
    _library().lmlab_lowrank_rows(x.data_ptr(), x.stride(0), n if need else 0, k, matrix.data_ptr(), matrix.shape[0],
                                  scale, _ptr(h), _struct(update), _threads(work))
    return h


def update(update: Update) -> torch.Tensor:
    """Runs a rank-r update; returns its output."""
    _library().lmlab_lowrank_update(ctypes.byref(update.struct), _threads(_work(update)))
    return update.out


def _struct(update: Update | None):
    return None if update is None else ctypes.byref(update.struct)


def _work(update: Update | None) -> int:
    """Multiply-adds of a rank-r update (rows x cols x r)."""
    return 0 if update is None else update.struct.rows * update.struct.cols * update.struct.r


def _threads(work: int) -> int:
    """Threads for a call of `work` multiply-adds: torch's, with at least MIN_WORK_PER_THREAD each."""
    return max(1, min(torch.get_num_threads(), work // max(1, MIN_WORK_PER_THREAD)))


def backward(grad_y: torch.Tensor, x: torch.Tensor, h: torch.Tensor, bt: torch.Tensor, scaling: float, *,
             need_b: bool, need_a: bool, need_h0: bool = False, g: torch.Tensor | None = None,
             factor: torch.Tensor | None = None, h0: torch.Tensor | None = None, need_factor: bool = False,
             keep: float = 1.0, update: Update | None = None) -> tuple:
    """The thin products of an adapter's backward (see lowrank.c), for grad_y [N, out], x [N, in] (the adapter's
    input, after dropout), h [N, r] (what multiplied B^T in forward), bt [r, out] (B^T, with DoRA's g folded in):

    grad_B [out, r] = s g (.) (grad_y^T h); grad_h = s grad_y bt^T; grad_factor = (grad_h * h0).sum(-1) [N, 1];
    grad_h0 = grad_h * factor * keep; grad_A [r, in] = grad_h0^T x. Returns (grad_B, grad_A, grad_h0, grad_factor),
    each None unless asked for; runs `update` in the same parallel region."""
    grad_y, x, bt = _rows(grad_y), _rows(x), bt.contiguous()
    h = None if h is None else h.contiguous()
    n, out = grad_y.shape
    r = bt.shape[0]
    shapes = {"x": (x, (n, x.shape[1])), "bt": (bt, (r, out)), "h": (h, (n, r)), "g": (g, (out,)),
              "factor": (factor, (n, 1)), "h0": (h0, (n, r))}
    for name, (t, shape) in shapes.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, not {shape} (grad_y {tuple(grad_y.shape)}, rank {r})")
    if need_factor and (factor is None or h0 is None) or need_b and h is None:
        raise ValueError("grad_B needs h, and the factor's gradient the factor and h0")
    grad_b = grad_y.new_empty(out, r) if need_b else None
    grad_a = x.new_empty(r, x.shape[1]) if need_a else None
    grad_h0 = x.new_empty(n, r) if need_h0 else None
    grad_factor = x.new_empty(n, 1) if need_factor else None
    factor, h0, g = (None if t is None else t.contiguous() for t in (factor, h0, g))
    args = _Backward(grad_y.data_ptr(), x.data_ptr(), _ptr(h), _ptr(h0), bt.data_ptr(), _ptr(g), _ptr(factor),
                     _ptr(grad_b), _ptr(grad_a), _ptr(grad_h0), _ptr(grad_factor), grad_y.stride(0), x.stride(0), n,
                     x.shape[1], out, r, scaling, keep)
    work = n * r * ((out if need_b else 0) + (out if need_a or need_h0 or need_factor else 0)
                    + (x.shape[1] if need_a else 0)) + _work(update)
    if _library().lmlab_lowrank_backward(ctypes.byref(args), _struct(update), _threads(work)) != 0:
        raise MemoryError("the CPU low-rank kernel could not allocate its work buffer")
    return grad_b, grad_a, grad_h0, grad_factor
