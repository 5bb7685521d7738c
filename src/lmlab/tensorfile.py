"""Reading a safetensors file (adapters, MU checkpoints) with one-line errors; never a pickle."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from lmlab.errors import CheckpointError


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file at `path` (which the caller has checked exists), on the CPU.

    A truncated or garbled file, or a tensor that cannot be read, is a CheckpointError naming the file.
    """
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types for truncated or garbled files
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); "
                              "it may be truncated or corrupt") from None
    tensors = {}
    with handle:
        for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
            try:
                tensors[key] = handle.get_tensor(key)
            except Exception as exc:
                raise CheckpointError(f"{path}: tensor '{key}' cannot be read ({exc})") from None
    return tensors
