"""Adapter files: save/load in our format or peft's, merge into the base weights, export to peft (s. 6).

Our format is a directory with `adapter_config.json` (format name and version, the HyLoRADA config, the
resolved max_positions, the base model's name and architecture, the adapted module names) and
`adapter_model.safetensors` with every trainable tensor, named as in `model.named_parameters()`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors.torch import save_file
from torch import nn

from lmlab.config import describe_validation_error
from lmlab.errors import CheckpointError, ConfigError
from lmlab.fileio import atomic_path, atomic_write_text, read_tensors
from lmlab.hylorada.config import HyLoRADAConfig
from lmlab.hylorada.layers import HyLoRADALinear
from lmlab.hylorada.model import adapter_parameters, apply_hylorada, hylorada_state

FORMAT = "lmlab-hylorada"
FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def save_adapter(model: nn.Module, directory: str | Path) -> dict:
    """Write the adapter (config + every trainable tensor) to `directory`; returns its size.

    Each file goes to a temporary name and is renamed into place, the weights first and the config last: an
    interrupted save never leaves a truncated file, and a config is never newer than its weights."""
    state = hylorada_state(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().contiguous() for name, p in adapter_parameters(model).items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": state.config.model_dump(mode="json"),
        "max_positions": state.max_positions,
        "base_model": state.base_model,
        "adapted_modules": state.adapted,
    }
    with atomic_path(directory / WEIGHTS_FILE) as staging:
        save_file(tensors, str(staging), metadata={"format": "pt"})
    atomic_write_text(directory / CONFIG_FILE, json.dumps(meta, indent=2) + "\n")
    weight_bytes = (directory / WEIGHTS_FILE).stat().st_size
    return {
        "directory": str(directory),
        "num_tensors": len(tensors),
        "num_params": sum(t.numel() for t in tensors.values()),
        "weights_bytes": weight_bytes,
        "total_bytes": weight_bytes + (directory / CONFIG_FILE).stat().st_size,
    }


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Apply an adapter saved by `save_adapter` or by peft's `save_pretrained` (LoRA/rsLoRA/DoRA) to `model`."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} does not exist: give a directory written by save_adapter or by "
                              "peft's save_pretrained")
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{config_path} does not hold a JSON object")
    if "peft_type" in meta:
        config, tensors, max_positions = _read_peft(meta, directory)
    else:
        config, tensors, max_positions = _read_ours(meta, directory, model)
    try:
        apply_hylorada(model, config, max_positions=max_positions)
    except ConfigError as exc:  # e.g. the adapted module names do not exist in this model
        raise CheckpointError(f"{directory}: the adapter does not fit this model: {exc}") from None
    try:
        _copy_into(model, tensors, directory / WEIGHTS_FILE)
    except CheckpointError:
        _remove(model, merge=False)  # leave the caller's model as it was
        raise
    return model


def _read_ours(meta: dict, directory: Path, model: nn.Module) -> tuple[HyLoRADAConfig, dict, int]:
    config_path = directory / CONFIG_FILE
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{config_path} is neither a HyLoRADA adapter (format '{FORMAT}') nor a peft adapter")
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{config_path} has no integer format_version")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{config_path} has format_version {version}, newer than this lmlab reads "
                              f"({FORMAT_VERSION}): upgrade lmlab")
    base = meta.get("base_model") or {}
    max_positions = meta.get("max_positions")
    if not isinstance(base, dict):
        raise CheckpointError(f"{config_path}: 'base_model' must be a JSON object, got {base!r}")
    if max_positions is not None and (type(max_positions) is not int or max_positions < 1):
        raise CheckpointError(f"{config_path}: 'max_positions' must be a positive integer, got {max_positions!r}")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if base.get("model_type") and model_type and base["model_type"] != model_type:
        raise CheckpointError(f"{config_path} is an adapter for a '{base['model_type']}' model "
                              f"({base.get('architecture')}), but the model is '{model_type}' ({type(model).__name__})")
    try:
        config = HyLoRADAConfig.model_validate(meta.get("config", {}))
    except ValidationError as exc:
        raise CheckpointError(f"{config_path}: {describe_validation_error(exc, HyLoRADAConfig)}") from None
    return config, _read_tensors(directory / WEIGHTS_FILE), max_positions


def _read_peft(meta: dict, directory: Path) -> tuple[HyLoRADAConfig, dict, None]:
    config_path = directory / CONFIG_FILE
    if meta.get("peft_type") != "LORA":
        raise CheckpointError(f"{config_path}: peft adapter type '{meta.get('peft_type')}' is not supported "
                              "(only LoRA, rsLoRA and DoRA)")
    unsupported = {
        "rank_pattern": "per-module ranks",
        "alpha_pattern": "per-module alphas",
        "modules_to_save": "fully trained extra modules",
        "layers_to_transform": "a subset of layers",
        "trainable_token_indices": "trainable token rows",
        "target_parameters": "adapters on raw parameters",
        "lora_bias": "a trained LoRA bias",
    }
    for key, what in unsupported.items():
        if meta.get(key):
            raise CheckpointError(f"{config_path}: {key} ({what}) is not supported by HyLoRADA")
    if meta.get("bias", "none") != "none":
        raise CheckpointError(f"{config_path}: bias='{meta['bias']}' (trained base biases) is not supported")
    raw = _read_tensors(directory / WEIGHTS_FILE)
    renames = {".lora_A.weight": ".lora_A", ".lora_B.weight": ".lora_B", ".lora_magnitude_vector.weight":
               ".lora_magnitude", ".lora_magnitude_vector": ".lora_magnitude"}
    tensors, modules = {}, set()
    for key, tensor in raw.items():
        name = key.removeprefix(_PEFT_PREFIX)
        for old, new in renames.items():
            if name.endswith(old):
                name = name[: -len(old)] + new
                modules.add(name[: -len(new)])
                break
        tensors[name] = tensor
    if not modules:
        raise CheckpointError(f"{directory / WEIGHTS_FILE} holds no LoRA tensors (lora_A/lora_B)")
    try:
        config = HyLoRADAConfig(
            r=meta["r"], alpha=meta["lora_alpha"], dropout=meta.get("lora_dropout", 0.0),
            use_rslora=bool(meta.get("use_rslora", False)), use_dora=bool(meta.get("use_dora", False)),
            target_modules=sorted(modules), position_bias=False, landmarks="none",
        )
    except (KeyError, ValidationError) as exc:
        raise CheckpointError(f"{config_path}: not a usable peft LoRA config ({exc})") from None
    return config, tensors, None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        pickled = path.with_suffix(".bin")
        if pickled.is_file():  # peft's older default: a pickle, which can run code when it is loaded
            raise CheckpointError(f"{path.parent} holds only {pickled.name} (pickle); lmlab loads safetensors only: "
                                  "re-save it in a trusted environment with safe_serialization=True")
        raise CheckpointError(f"{path} does not exist: the adapter directory is incomplete")
    return read_tensors(path)


def _copy_into(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Copy checkpoint tensors into the adapter's parameters; names and shapes must match exactly."""
    params = adapter_parameters(model)
    unexpected = sorted(set(tensors) - set(params))
    if unexpected:
        raise CheckpointError(f"{path}: tensor '{unexpected[0]}' has no place in this model "
                              f"({len(unexpected)} such; the adapter was made for a model with other module names)")
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise CheckpointError(f"{path}: no tensor '{missing[0]}' ({len(missing)} missing; the adapter was saved "
                              "with another configuration or model)")
    for name, param in params.items():
        tensor = tensors[name]
        if tensor.shape != param.shape:
            raise CheckpointError(f"{path}: tensor '{name}' has shape {list(tensor.shape)} but the model needs "
                                  f"{list(param.shape)} (an adapter for a model of another size)")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])


# ---------------------------------------------------------------------------------------------------
# Merge and export


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold LoRA/DoRA into the base weights (Linear and Conv1D) and remove HyLoRADA; returns the plain model.

    The model is changed in place (as peft's merge_and_unload). Position bias and landmarks cannot be
    folded, so a model with either is refused rather than silently changed.
    """
    state = hylorada_state(model)
    config = state.config
    if config.position_bias:
        raise ConfigError("merge_adapter: the position bias scales each token's update by a factor that depends on "
                          "its position, which no weight matrix can hold; train with position_bias=False to merge")
    if config.landmarks != "none":
        raise ConfigError(f"merge_adapter: landmarks ('{config.landmarks}') add vectors chosen per token, not a "
                          "weight change, so they cannot be merged; keep the adapter (save_adapter) instead")
    _remove(model, merge=True)
    return model


def _remove(model: nn.Module, merge: bool) -> None:
    """Unwrap every adapted layer (folding the update into its weight when `merge`), drop hooks and state."""
    state = hylorada_state(model)
    ours = {id(m) for m in state.modules()}
    for module in model.modules():
        for hooks, extra in ((module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)),
                             (module._forward_hooks, (module._forward_hooks_with_kwargs,
                                                      module._forward_hooks_always_called))):
            for hook_id, hook in list(hooks.items()):
                if id(getattr(hook, "__self__", None)) in ours:
                    del hooks[hook_id]
                    for table in extra:
                        table.pop(hook_id, None)
    for name in state.adapted:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer: HyLoRADALinear = getattr(parent, child)
        if merge:
            with torch.no_grad():
                layer.base_layer.weight.copy_(layer.merged_weight())
        setattr(parent, child, layer.base_layer)
    del model.hylorada
    for name, param in model.named_parameters():
        param.requires_grad_(state.base_requires_grad.get(name, True))


def export_peft(model: nn.Module, directory: str | Path) -> dict:
    """Write the LoRA/DoRA part in peft's format (`PeftModel.from_pretrained` reads it); returns its size.

    Refuses when the config has parts peft's LoRA cannot hold (position bias, landmarks, trained
    embeddings or norms).
    """
    from peft import LoraConfig  # peft is only needed here

    state = hylorada_state(model)
    config = state.config
    extra = [part for part, on in (("position bias", config.position_bias),
                                    (f"landmarks='{config.landmarks}'", config.landmarks != "none"),
                                    ("train_embeddings", config.train_embeddings),
                                    ("train_norms", config.train_norms)) if on]
    if extra:
        raise ConfigError(f"export_peft: peft's LoRA format cannot hold {', '.join(extra)}; use save_adapter, or "
                          "train with position_bias=False and landmarks='none' to export")
    layers = {name: model.get_submodule(name) for name in state.adapted}
    alpha = int(config.alpha) if float(config.alpha).is_integer() else config.alpha
    causal = type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    peft_config = LoraConfig(
        r=config.r, lora_alpha=alpha, lora_dropout=config.dropout, use_rslora=config.use_rslora,
        use_dora=config.use_dora, target_modules=list(layers), bias="none",
        fan_in_fan_out=any(layer.fan_in_fan_out for layer in layers.values()),
        base_model_name_or_path=state.base_model.get("name_or_path") or None,
        task_type="CAUSAL_LM" if causal else None,
    )
    directory = Path(directory)
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().contiguous()
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().contiguous()
        if layer.lora_magnitude is not None:
            tensors[f"{_PEFT_PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude.detach().contiguous()
    with atomic_path(directory / WEIGHTS_FILE) as staging:  # weights first, config last, as save_adapter
        save_file(tensors, str(staging), metadata={"format": "pt"})
    peft_config.save_pretrained(str(directory))
    weight_bytes = (directory / WEIGHTS_FILE).stat().st_size
    return {"directory": str(directory), "num_tensors": len(tensors),
            "num_params": sum(t.numel() for t in tensors.values()), "weights_bytes": weight_bytes}

