"""Adapter files: save/load in our format or peft's, merge into the base weights, export to peft (s. 6).

Our format is a directory with `adapter_config.json` (format name and version, the HyLoRADA config, the
resolved max_positions, the base model's name and architecture, the adapted module names, and the context
extension the model was trained with: its RoPE scaling and any stretching of a learned position table) and
`adapter_model.safetensors` with every trainable tensor, named as in `model.named_parameters()`. Loading applies
the recorded context extension to the fresh base, so the loaded model is the model that was trained.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors.torch import save_file
from torch import nn

from lmlab.config import describe_validation_error
from lmlab.errors import CheckpointError, ConfigError
from lmlab.fileio import atomic_path, atomic_write_text, read_tensors
from lmlab.hylorada.config import HyLoRADAConfig
from lmlab.hylorada.extension import INTERPOLATED, interpolate_position_embeddings, position_table
from lmlab.hylorada.layers import HyLoRADALinear
from lmlab.hylorada.model import adapter_parameters, apply_hylorada, hylorada_state
from lmlab.models.hf import context_length

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
    extension = position_extension(model)
    if extension is not None:
        meta["position_extension"] = extension
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
    extension = None
    if "peft_type" in meta:
        config, tensors, max_positions = _read_peft(meta, directory)
    else:
        config, tensors, max_positions = _read_ours(meta, directory, model)
        extension = _read_extension(meta, config_path)
    undo = _extend_positions(model, extension, config_path) if extension else _nothing
    try:
        apply_hylorada(model, config, max_positions=max_positions)
    except ConfigError as exc:  # e.g. the adapted module names do not exist in this model
        undo()
        raise CheckpointError(f"{directory}: the adapter does not fit this model: {exc}") from None
    try:
        _copy_into(model, tensors, directory / WEIGHTS_FILE)
    except CheckpointError:
        _remove(model, merge=False)  # leave the caller's model as it was
        undo()
        raise
    return model


# ---------------------------------------------------------------------------------------------------
# Context extension: recorded with the adapter, applied again on load


def position_extension(model: nn.Module) -> dict | None:
    """How the model's positions were extended beyond its pretrained base, as `save_adapter` records it: the RoPE
    scaling on its config (`rope_parameters` whose type is not 'default', e.g. from `rope_scaling`, with
    `max_position_embeddings`) and the sizes a learned position table was stretched through by
    `interpolate_position_embeddings` (`interpolated_positions`, e.g. [1024, 2048]); None when neither."""
    config = getattr(model, "config", None)
    record: dict = {}
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and rope.get("rope_type", "default") != "default":
        record["rope_parameters"] = json.loads(json.dumps(dict(rope)))
        record["max_position_embeddings"] = getattr(config, "max_position_embeddings", None)
    sizes = getattr(model, INTERPOLATED, None)
    if sizes:
        record["interpolated_positions"] = [int(n) for n in sizes]
    return record or None


def _read_extension(meta: dict, config_path: Path) -> dict | None:
    extension = meta.get("position_extension")
    if extension is None:
        return None
    if not isinstance(extension, dict):
        raise CheckpointError(f"{config_path}: 'position_extension' must be a JSON object, got {extension!r}")
    rope = extension.get("rope_parameters")
    if rope is not None and not (isinstance(rope, dict) and isinstance(rope.get("rope_type"), str)
                                 and isinstance(rope.get("rope_theta"), (int, float))):
        raise CheckpointError(f"{config_path}: 'position_extension.rope_parameters' must be an object with "
                              f"rope_type and rope_theta, got {rope!r}")
    positions = extension.get("max_position_embeddings")
    if positions is not None and (type(positions) is not int or positions < 1):
        raise CheckpointError(f"{config_path}: 'position_extension.max_position_embeddings' must be a positive "
                              f"integer, got {positions!r}")
    sizes = extension.get("interpolated_positions")
    if sizes is not None and not (isinstance(sizes, list) and len(sizes) >= 2
                                  and all(type(n) is int and n >= 2 for n in sizes)
                                  and all(a < b for a, b in zip(sizes, sizes[1:], strict=False))):
        raise CheckpointError(f"{config_path}: 'position_extension.interpolated_positions' must be increasing "
                              f"table sizes, e.g. [1024, 2048], got {sizes!r}")
    return extension


def _nothing() -> None:
    return None


def _extend_positions(model: nn.Module, extension: dict, config_path: Path):
    """Give `model` the context extension the adapter was trained with (RoPE scaling, a stretched position table);
    returns a function that puts the model back as it was (for a load that fails later)."""
    undo: list = []

    def restore() -> None:
        for step in reversed(undo):
            step()

    try:
        sizes = extension.get("interpolated_positions")
        if sizes:
            _stretch_table(model, sizes, config_path, undo)
        rope = extension.get("rope_parameters")
        if rope:
            _scale_rope(model, rope, extension.get("max_position_embeddings"), config_path, undo)
    except BaseException:
        restore()
        raise
    return restore


def _stretch_table(model: nn.Module, sizes: list[int], config_path: Path, undo: list) -> None:
    try:
        table = position_table(model)
    except ConfigError:
        raise CheckpointError(f"{config_path}: the adapter was trained with a learned position table stretched from "
                              f"{sizes[0]} to {sizes[-1]} rows, but {type(model).__name__} has no such table") from None
    rows = table.num_embeddings
    if rows == sizes[-1]:
        return  # a base saved after stretching
    if rows != sizes[0]:
        raise CheckpointError(f"{config_path}: the adapter was trained with the position table stretched from "
                              f"{sizes[0]} to {sizes[-1]} rows, but the model's table has {rows}: load it onto the "
                              "base model it was trained on")
    weight, config, marker = table.weight, model.config, getattr(model, INTERPOLATED, None)
    positions = config.max_position_embeddings

    def put_back() -> None:
        table.weight, table.num_embeddings = weight, rows
        config.max_position_embeddings = positions
        if marker is None:
            model.__dict__.pop(INTERPOLATED, None)
        else:
            setattr(model, INTERPOLATED, marker)

    undo.append(put_back)
    for size in sizes[1:]:
        interpolate_position_embeddings(model, size)


def _scale_rope(model: nn.Module, rope: dict, positions: int | None, config_path: Path, undo: list) -> None:
    config = model.config
    current = getattr(config, "rope_parameters", None)
    if not isinstance(current, dict) or "rope_theta" not in current:
        raise CheckpointError(f"{config_path}: the adapter was trained with RoPE scaling '{rope['rope_type']}', but "
                              f"the model ('{getattr(config, 'model_type', '?')}') does not use RoPE")
    if dict(current) == rope and positions in (None, context_length(config)):
        return  # the model already has it
    if float(current["rope_theta"]) != float(rope["rope_theta"]):
        raise CheckpointError(f"{config_path}: the adapter was trained on a model with rope_theta "
                              f"{rope['rope_theta']}, but this model has {current['rope_theta']}: load it onto the "
                              "base it was trained on")
    rotary = [(name, module) for name, module in model.named_modules()
              if hasattr(module, "inv_freq") and hasattr(module, "rope_type") and hasattr(module, "config")]
    if not rotary:
        raise CheckpointError(f"{config_path}: the adapter was trained with RoPE scaling '{rope['rope_type']}', but "
                              f"no rotary embedding module of {type(model).__name__} can take it; build the model "
                              "with lmlab.hylorada.rope_scaling applied to its config, then load the adapter")
    configs = {id(c): c for c in [config, *(m.config for _, m in rotary)]}
    saved = {key: (c, c.rope_parameters, c.max_position_embeddings) for key, c in configs.items()}

    def put_back() -> None:
        for c, params, length in saved.values():
            c.rope_parameters, c.max_position_embeddings = params, length
        for name, module in rotary:
            _set_submodule(model, name, module)

    undo.append(put_back)
    for c in configs.values():
        c.rope_parameters = dict(rope)
        if positions is not None:
            c.max_position_embeddings = positions
    for name, module in rotary:  # rotary frequencies are computed when the module is built: build it again
        try:
            fresh = type(module)(module.config).to(module.inv_freq.device)
        except (TypeError, ValueError, KeyError) as exc:
            put_back()
            undo.remove(put_back)
            raise CheckpointError(f"{config_path}: cannot rebuild {type(module).__name__} with RoPE scaling "
                                  f"'{rope['rope_type']}' ({exc}); build the model with lmlab.hylorada.rope_scaling "
                                  "applied to its config, then load the adapter") from None
        fresh.train(module.training)
        _set_submodule(model, name, fresh)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


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

    What merges: LoRA, rsLoRA and DoRA, with trained embeddings and norms (already base weights). The position
    bias and landmarks depend on each token's position or on the hidden states, which no weight matrix can hold,
    so a model with either is refused (ConfigError, the model unchanged) rather than silently changed. The model
    is changed in place, as peft's merge_and_unload: the returned model IS `model`, without its adapter, so
    `save_adapter` / `export_peft` it first (or merge a `copy.deepcopy(model)`).
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
    state.remove_hooks()
    for name, param in model.named_parameters():  # trained base parts back in the base's dtype
        if name in state.base_dtypes:
            param.data = param.data.to(state.base_dtypes[name])
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

    What exports: LoRA, rsLoRA and DoRA adapters. Refuses (ConfigError, nothing written) when the config has
    parts peft's LoRA cannot hold: position bias, landmarks, trained embeddings or norms (`save_adapter` keeps
    everything). A RoPE scaling the model was trained with is not part of peft's format: build the base with it.
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
    extension = position_extension(model)
    if extension is not None:
        warnings.warn(f"export_peft: the model was trained with a context extension ({extension}) that peft's format "
                      "does not record; build the base with it before loading the exported adapter in peft",
                      RuntimeWarning, stacklevel=2)
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

