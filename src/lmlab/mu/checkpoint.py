"""Checkpoints of MU and dense models: `model.safetensors` + `config.json` (+ the tokenizer's files).

`config.json` holds the model kind ("mu" or "dense"), its config, whether a tokenizer was saved, and the
caller's `extra` metadata (e.g. step and validation perplexity of a best checkpoint). Every parameter is
stored once: a tied head is the token embedding and is re-tied by the model's constructor on load.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import save_file
from torch import nn

from lmlab.config import describe_validation_error
from lmlab.errors import CheckpointError
from lmlab.fileio import read_tensors
from lmlab.mu.config import DenseConfig, MUConfig
from lmlab.mu.dense import DenseModel
from lmlab.mu.model import MUModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "lmlab-mu-checkpoint"
MODEL_KINDS: dict[str, tuple[type, type[nn.Module]]] = {"mu": (MUConfig, MUModel), "dense": (DenseConfig, DenseModel)}


def save_checkpoint(
    model: MUModel | DenseModel, directory: str | os.PathLike, tokenizer=None, extra: dict | None = None
) -> Path:
    """Write the checkpoint into `directory` atomically: everything goes to a temporary sibling directory
    that then replaces `directory`, so a crash never leaves a half-written checkpoint behind.

    `tokenizer`: a Hugging Face tokenizer (saved with `save_pretrained`) or None. `extra`: JSON-serialisable.
    """
    kind = next((name for name, (_, cls) in MODEL_KINDS.items() if type(model) is cls), None)
    if kind is None:
        raise TypeError(f"save_checkpoint takes an MUModel or DenseModel, got {type(model).__name__}")
    # Serialise first so a non-JSON `extra` fails before anything touches the disk.
    manifest = json.dumps(
        {
            "format": FORMAT,
            "model": kind,
            "config": model.config.model_dump(mode="json"),
            "tokenizer": tokenizer is not None,
            "extra": extra or {},
        },
        indent=2,
    )
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        tensors = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters()}
        save_file(tensors, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(manifest, encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        _replace_directory(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _replace_directory(new: Path, target: Path) -> None:
    """Move `new` to `target`; an existing `target` is moved aside first and deleted after (directories
    cannot be renamed over non-empty ones)."""
    if not target.exists():
        os.rename(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rename(target, old / target.name)
    os.rename(new, target)
    shutil.rmtree(old)


def load_checkpoint(directory: str | os.PathLike) -> tuple[MUModel | DenseModel, Any, dict]:
    """(model on CPU in eval mode, tokenizer or None, extra) from a directory written by `save_checkpoint`.

    Raises CheckpointError naming the file or tensor when something is missing, corrupt or mismatched.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    manifest = _read_manifest(directory / CONFIG_FILE)
    config_cls, model_cls = MODEL_KINDS[manifest["model"]]
    try:
        config = config_cls.model_validate(manifest.get("config"))
    except ValidationError as exc:
        raise CheckpointError(f"{directory / CONFIG_FILE}: {describe_validation_error(exc, config_cls)}") from None
    model = model_cls(config)
    _load_weights(model, directory / WEIGHTS_FILE)
    model.eval()
    tokenizer = _load_tokenizer(directory) if manifest.get("tokenizer") else None
    return model, tokenizer, manifest.get("extra") or {}


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; is this a directory written by save_checkpoint?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an lmlab MU checkpoint config (expected \"format\": \"{FORMAT}\")")
    if manifest.get("model") not in MODEL_KINDS:
        raise CheckpointError(f"{path}: model kind {manifest.get('model')!r} is not one of {', '.join(MODEL_KINDS)}")
    return manifest


def _load_weights(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    tensors = read_tensors(path)
    params = dict(model.named_parameters())
    missing = sorted(params.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - params.keys())
    if missing:
        raise CheckpointError(f"{path} lacks tensor '{missing[0]}' ({len(missing)} missing) that {CONFIG_FILE} needs")
    if unexpected:
        raise CheckpointError(f"{path} has tensor '{unexpected[0]}' that the model of {CONFIG_FILE} does not have")
    for name, param in params.items():
        if tensors[name].shape != param.shape:
            raise CheckpointError(
                f"{path}: tensor '{name}' has shape {list(tensors[name].shape)} but {CONFIG_FILE} describes "
                f"{list(param.shape)}"
            )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])


def _load_tokenizer(directory: Path):
    # Imported here: transformers takes seconds to import and only checkpoints with a tokenizer need it.
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"the tokenizer files in {directory} cannot be loaded ({exc})") from None
