"""Compiled CPU kernels with a torch fallback: the same results either way, see each module."""

from lmlab.kernels.attention import (
    causal_attention,
    hf_attention_forward,
    kernel_attention,
    kernel_available,
    restore_attention,
    use_kernel_attention,
)

__all__ = [
    "causal_attention", "hf_attention_forward", "kernel_attention", "kernel_available", "restore_attention",
    "use_kernel_attention",
]
