"""Compiled CPU kernels with a torch fallback: the same results either way, see each module."""

from lmlab.kernels.attention import causal_attention, kernel_available

__all__ = ["causal_attention", "kernel_available"]
