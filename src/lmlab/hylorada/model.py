"""Injecting HyLoRADA into a Hugging Face causal LM, and what the training loop and studies ask of it.

`apply_hylorada` wraps the target layers in place, freezes the base, and registers everything else
(position-bias table, landmarks, learnable boundaries) as the submodule `model.hylorada`, so it is in
`model.parameters()`, moves with `.to()`, and is saved and counted. A forward pre-hook on the model
computes the token positions once per forward for all HyLoRADA modules (docs/hylorada.md section 2).
"""

from __future__ import annotations

import contextlib
import inspect
import re

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers.pytorch_utils import Conv1D

from lmlab.engine.hooks import PaddedLM
from lmlab.engine.optim import GroupRule
from lmlab.errors import ConfigError
from lmlab.hylorada.config import HyLoRADAConfig
from lmlab.hylorada.landmarks import ConstantLandmarks, PooledLandmarks, PositionAdaptiveLandmarks
from lmlab.hylorada.layers import HyLoRADALinear, trainable_dtype
from lmlab.hylorada.position import (
    LearnableBuckets,
    PositionBias,
    PositionContext,
    bucket_edges,
    bucketize,
    token_positions,
)
from lmlab.models.hf import context_length, kv_cache

# docs/hylorada.md section 1: default targets per `config.model_type`
DEFAULT_TARGETS: dict[str, list[str]] = {
    "gpt2": ["attn.c_attn", "attn.c_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt_neox": ["query_key_value", "dense"],
}

COMPONENTS = ("lora", "dora_magnitude", "position_bias", "landmarks", "bucket_boundaries", "embeddings", "norms")

_LINEAR_TYPES = (nn.Linear, Conv1D)
_CACHE_ATTRIBUTE = "_hylorada_pool"  # running prefix sums of causal pooling, carried by the KV cache


class HyLoRADAState(nn.Module):
    """Everything HyLoRADA adds outside the adapted layers; registered on the model as `model.hylorada`."""

    def __init__(
        self,
        config: HyLoRADAConfig,
        max_positions: int,
        arg_names: list[str],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.config = config
        self.max_positions = max_positions
        self.context = PositionContext()
        self.edges = bucket_edges(config.num_buckets, max_positions, config.bucket_spacing)
        self.register_buffer("bucket_edges", torch.tensor(self.edges, device=device), persistent=False)
        self.arg_names = arg_names  # the model's forward parameters, to read positional arguments
        self.position_bias = PositionBias(config.num_buckets).to(device, dtype) if config.position_bias else None
        self.landmarks: nn.Module | None = None
        self.layer_landmarks: nn.ModuleList | None = None
        # filled by apply_hylorada
        self.base_model: dict[str, str] = {}
        self.adapted: list[str] = []
        self.trained_base: dict[str, list[str]] = {"embeddings": [], "norms": []}
        self.base_requires_grad: dict[str, bool] = {}
        # trained base parameters held in float32 on a half-precision base: their names and the dtype they had
        self.base_dtypes: dict[str, torch.dtype] = {}
        # the handles of the forward hooks apply_hylorada registers (on the model, its final norm, its blocks): the
        # one way they are removed (`remove_hooks`). A deep copy of the model copies them with it, pointing at the
        # copy's hooks.
        self.hook_handles: list[RemovableHandle] = []

    def add_landmarks(self, hidden_size: int, num_blocks: int, dtype: torch.dtype, device: torch.device) -> None:
        """The landmark modules of `config.landmarks`. Called after the adapters are built, so that their random
        initialisation draws the same numbers whether or not a configuration has landmarks: configurations that
        differ by landmarks alone then start from the same LoRA weights for a seed (a sharper paired comparison)."""
        config, max_positions = self.config, self.max_positions
        factory = {"dtype": dtype, "device": device}
        design, k = config.landmarks, config.num_landmarks
        if design in ("position_adaptive", "learnable_bucket"):
            buckets = None
            if design == "learnable_bucket":
                buckets = LearnableBuckets(self.edges, max_positions, config.boundary_temperature,
                                           config.boundary_assignment).to(device)
            self.landmarks = PositionAdaptiveLandmarks(
                hidden_size, k, config.num_buckets, config.dropout, self.context, buckets, **factory
            )
        elif design in ("original", "original_leaky"):
            self.landmarks = PooledLandmarks(hidden_size, k, config.dropout, self.context, "final",
                                             leaky=design == "original_leaky", **factory)
        elif design == "constant":
            self.landmarks = ConstantLandmarks(hidden_size, k, config.dropout, **factory)
        elif design == "per_layer":
            self.layer_landmarks = nn.ModuleList(
                PooledLandmarks(hidden_size, k // 2, config.dropout, self.context, f"block{i}", **factory)
                for i in range(num_blocks)
            )

    def remove_hooks(self) -> None:
        """Remove every forward hook apply_hylorada registered for this state, through its handle."""
        while self.hook_handles:
            self.hook_handles.pop().remove()

    @property
    def pools(self) -> bool:
        return self.config.landmarks in ("original", "original_leaky", "per_layer")

    def before_forward(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the model: token positions, buckets and the bias term for this forward."""
        inputs = dict(zip(self.arg_names, args, strict=False))
        inputs.update(kwargs)
        reference = inputs.get("input_ids")
        if reference is None:
            reference = inputs.get("inputs_embeds")
        if reference is None:
            raise ValueError("HyLoRADA needs input_ids or inputs_embeds to compute token positions")
        batch, length = reference.shape[:2]
        past = kv_cache(inputs)
        past_length = past.get_seq_length() if past is not None and hasattr(past, "get_seq_length") else 0
        mask = inputs.get("attention_mask")
        ctx = self.context
        ctx.positions = token_positions(
            batch,
            length,
            attention_mask=mask,
            position_ids=inputs.get("position_ids"),
            past_length=past_length,
            device=reference.device,
        )
        ctx.buckets = bucketize(ctx.positions, self.bucket_edges)
        if mask is not None and mask.dim() == 2:
            ctx.token_mask = mask[:, -length:].bool()
        else:
            ctx.token_mask = torch.ones(batch, length, dtype=torch.bool, device=reference.device)
        ctx.bias_term = self.position_bias(ctx.buckets) if self.position_bias is not None else None
        ctx.pool_now = {}
        ctx.pool_past = {}
        if self.pools and past_length > 0:
            carried = getattr(past, _CACHE_ATTRIBUTE, None)
            if carried is None or carried["length"] != past_length:
                raise RuntimeError(
                    f"landmarks='{self.config.landmarks}' pool over all earlier tokens, but this KV cache was not "
                    "produced by this model's previous forward calls: decode with the cache the model returned"
                )
            ctx.pool_past = carried["sums"]

    def after_forward(self, model: nn.Module, args: tuple, output) -> None:
        """Forward hook of the model: leave the running pooled sums with the KV cache for the next step."""
        cache = kv_cache(output)
        if cache is not None and self.context.pool_now:
            setattr(cache, _CACHE_ATTRIBUTE, {"length": cache.get_seq_length(), "sums": dict(self.context.pool_now)})


# ---------------------------------------------------------------------------------------------------
# Injection


def apply_hylorada(model: nn.Module, config: HyLoRADAConfig, max_positions: int | None = None) -> nn.Module:
    """Wrap the target layers of `model` in place, freeze the base, add the HyLoRADA modules; returns `model`.

    `max_positions` (used when `config.max_positions` is None) is the run's max_length; without either,
    the model's context length (`max_position_embeddings` / `n_positions`).
    """
    if isinstance(getattr(model, "hylorada", None), HyLoRADAState):
        raise ConfigError("this model already has HyLoRADA adapters; apply_hylorada to a fresh base model")
    hf_config = getattr(model, "config", None)
    context = config.max_positions or max_positions or context_length(hf_config)
    if context is None:
        raise ConfigError("cannot tell the model's context length: set max_positions in the HyLoRADA config")
    if config.uses_positions and config.num_buckets > context:
        raise ConfigError(f"num_buckets={config.num_buckets} is more than max_positions={context}")
    targets = find_targets(model, config.target_modules)
    blocks_name, blocks = find_blocks(model)
    if config.landmarks == "per_layer" and blocks is None:
        raise ConfigError(f"landmarks='per_layer' needs the transformer blocks, not found in {type(model).__name__}")
    final_norm = None
    if config.landmarks not in ("none", "per_layer"):
        final_norm = find_final_norm(model, blocks_name)
    hidden_size = getattr(hf_config, "hidden_size", None) or model.get_input_embeddings().embedding_dim

    reference = next(model.parameters())
    dtype = trainable_dtype(reference.dtype)  # float32 on a bf16 / fp16 base, whose weights stay as they are
    arg_names = list(inspect.signature(model.forward).parameters)
    state = HyLoRADAState(config, context, arg_names, dtype, reference.device)
    state.base_requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    state.base_model = {
        "name_or_path": str(getattr(hf_config, "_name_or_path", "") or ""),
        "architecture": type(model).__name__,
        "model_type": str(getattr(hf_config, "model_type", "") or ""),
    }
    model.requires_grad_(False)
    model.add_module("hylorada", state)
    shared = state.context if config.position_bias else None
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, HyLoRADALinear(getattr(parent, child), config, shared))
    state.adapted = targets
    state.add_landmarks(hidden_size, len(blocks or []), dtype, reference.device)
    _unfreeze_base_parts(model, config, state)

    handles = state.hook_handles
    if config.uses_positions:
        handles.append(model.register_forward_pre_hook(state.before_forward, with_kwargs=True))
    if state.pools:
        handles.append(model.register_forward_hook(state.after_forward))
    if final_norm is not None:
        handles.append(final_norm.register_forward_hook(state.landmarks.after_final_norm))
    if state.layer_landmarks is not None:
        for block, landmarks in zip(blocks, state.layer_landmarks, strict=True):
            handles.append(block.register_forward_hook(landmarks.after_block))
    return model


def _unfreeze_base_parts(model: nn.Module, config: HyLoRADAConfig, state: HyLoRADAState) -> None:
    """LongLoRA-style extras: make the embeddings and/or norms trainable and record their names. On a bf16 / fp16
    base they train in float32 (as the adapters do: updates of the size of a learning rate vanish in bf16's 8-bit
    mantissa), while the modules holding them still take and give the base's dtype (`_keep_dtype`)."""
    if not (config.train_embeddings or config.train_norms):
        return
    params: dict[str, list[nn.Parameter]] = {"embeddings": [], "norms": []}
    for module_name, module in model.named_modules():
        if module_name.startswith("hylorada") or isinstance(module, HyLoRADALinear):
            continue
        kind = "embeddings" if isinstance(module, nn.Embedding) else "norms" if _is_norm(module) else None
        if kind == "embeddings" and config.train_embeddings or kind == "norms" and config.train_norms:
            for param in module.parameters(recurse=False):
                param.requires_grad_(True)
                params[kind].append(param)
    # record the names named_parameters() reports (a tied LM head shares the embedding tensor)
    reported = {id(p): n for n, p in model.named_parameters()}
    state.trained_base = {kind: sorted({reported[id(p)] for p in group}) for kind, group in params.items()}
    half = {id(p): p.dtype for group in params.values() for p in group if p.dtype in (torch.bfloat16, torch.float16)}
    if not half:
        return
    for module in model.modules():  # every module holding one, a tied LM head included
        held = [half[id(p)] for p in module.parameters(recurse=False) if id(p) in half]
        if held:
            state.hook_handles.extend(_keep_dtype(module, held[0]))
    for name, param in model.named_parameters():
        if id(param) in half:
            state.base_dtypes[name] = half[id(param)]
    for group in params.values():
        for param in group:
            if param.dtype != torch.float32:
                param.data = param.data.float()


def _keep_dtype(module: nn.Module, dtype: torch.dtype) -> list[RemovableHandle]:
    """Hooks that run `module` (whose weights are now float32) on float32 inputs and give its output back in
    `dtype`, the base's: the rest of the model sees what it saw before."""

    def upcast(mod, args):
        return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    def downcast(mod, args, out):
        return out.to(dtype) if torch.is_tensor(out) and out.is_floating_point() else out

    upcast.lmlab_dtype_cast = downcast.lmlab_dtype_cast = True  # lmlab.engine.lmhead.output_head knows them
    return [module.register_forward_pre_hook(upcast), module.register_forward_hook(downcast)]


def find_targets(model: nn.Module, target_modules: str | list[str] | None) -> list[str]:
    """Names of the Linear/Conv1D modules to adapt. An empty match is a ConfigError listing what exists."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear = [(n, m) for n, m in model.named_modules() if isinstance(m, _LINEAR_TYPES) and m is not head]
    if target_modules == "all-linear":
        blocks_name, _ = find_blocks(model)
        if blocks_name is None:
            raise ConfigError(f"target_modules='all-linear' needs the transformer blocks of {type(model).__name__}, "
                              "which were not found; give a list of module-name suffixes")
        names = [n for n, _ in linear if n.startswith(blocks_name + ".")]
        described = "'all-linear'"
    else:
        suffixes = target_modules
        if suffixes is None:
            suffixes = DEFAULT_TARGETS.get(model_type)
            if suffixes is None:
                raise ConfigError(
                    f"no default target modules for model type '{model_type}': set target_modules to 'all-linear' "
                    f"or a list of module-name suffixes (e.g. {_examples(linear)})"
                )
        matched = [(n, m) for n, m in model.named_modules() if any(_matches(n, s) for s in suffixes)]
        wrong = [f"{n} ({type(m).__name__})" for n, m in matched if not isinstance(m, _LINEAR_TYPES) or m is head]
        if wrong:
            raise ConfigError(f"target_modules {suffixes} match modules that are not Linear/Conv1D layers of the "
                              f"blocks: {', '.join(wrong[:3])}")
        names = [n for n, _ in matched]
        described = str(suffixes)
    if not names:
        raise ConfigError(
            f"target_modules {described} match no Linear/Conv1D module of {type(model).__name__}; "
            f"available names include {_examples(linear)}"
        )
    return names


def _matches(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _examples(named: list[tuple[str, nn.Module]], count: int = 5) -> str:
    # distinct suffixes after the block index, e.g. 'attn.c_attn', 'mlp.c_fc'
    seen: list[str] = []
    for name, _ in named:
        short = re.sub(r"^.*?\.\d+\.", "", name)
        if short not in seen:
            seen.append(short)
    return ", ".join(f"'{s}'" for s in seen[:count]) or "(no Linear/Conv1D modules)"


def find_blocks(model: nn.Module) -> tuple[str | None, nn.ModuleList | None]:
    """The ModuleList of transformer blocks: the first one with `num_hidden_layers` entries."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    for name, module in lists:
        if count is None or len(module) == count:
            return name, module
    return None, None


def find_final_norm(model: nn.Module, blocks_name: str | None) -> nn.Module:
    """The norm after the last block (GPT-2 `ln_f`, Llama `norm`, NeoX `final_layer_norm`)."""
    norms = [m for n, m in model.named_modules()
             if _is_norm(m) and not (blocks_name and n.startswith(blocks_name + "."))]
    if not norms:
        raise ConfigError(f"landmarks need the final norm of {type(model).__name__}, which was not found; "
                          "use landmarks='none' or 'per_layer'")
    return norms[-1]


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "Norm" in type(module).__name__


def hylorada_state(model: nn.Module) -> HyLoRADAState:
    state = getattr(model, "hylorada", None)
    if not isinstance(state, HyLoRADAState):
        raise ConfigError(f"{type(model).__name__} has no HyLoRADA adapters: call apply_hylorada or load_adapter first "
                          "(merge_adapter folds them into the model in place: save_adapter / export_peft before it)")
    return state


# ---------------------------------------------------------------------------------------------------
# Introspection for training and studies


def component_of(name: str, state: HyLoRADAState) -> str | None:
    """Which HyLoRADA component a parameter name belongs to (None: a frozen base parameter)."""
    if name.endswith((".lora_A", ".lora_B")):
        return "lora"
    if name.endswith(".lora_magnitude"):
        return "dora_magnitude"
    if name.endswith(".position_gate") or name.startswith("hylorada.position_bias."):
        return "position_bias"
    if name.endswith(".buckets.boundaries"):
        return "bucket_boundaries"
    if name.startswith(("hylorada.landmarks.", "hylorada.layer_landmarks.")):
        return "landmarks"
    for kind, names in state.trained_base.items():
        if name in names:
            return kind
    return None


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every tensor an adapter checkpoint holds, by parameter name (HyLoRADA parts + trained base parts)."""
    state = hylorada_state(model)
    return {n: p for n, p in model.named_parameters() if component_of(n, state) is not None}


def component_param_counts(model: nn.Module, trainable_only: bool = False) -> dict[str, int]:
    """Parameters per component: lora, dora_magnitude, position_bias, landmarks, bucket_boundaries, embeddings,
    norms (all keys present, 0 when off). `trainable_only` leaves out parameters frozen after `apply_hylorada`
    (e.g. adapters held at 0 in a positive control)."""
    state = hylorada_state(model)
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, param in model.named_parameters():
        kind = component_of(name, state)
        if kind is not None and (param.requires_grad or not trainable_only):
            counts[kind] += param.numel()
    return counts


def learned_boundaries(model: nn.Module) -> dict[str, list]:
    """Bucket boundaries in token positions: `initial` (the fixed scheme's edges) and `learned` (sorted), with
    `boundaries_u`, the parameter's exact values (float32, sorted, as fractions of max_positions), from which
    `LearnableBuckets.rebuild` gives back the trained assignment bit for bit - `learned` is rounded through a
    float32 product, and a soft assignment's argmax can flip at a near tie. `effective_buckets` counts the
    buckets the trained assignment tells apart, `initial_effective_buckets` those the untrained one did, both
    computed here the same way."""
    state = hylorada_state(model)
    buckets = getattr(state.landmarks, "buckets", None)
    if buckets is None:
        raise ConfigError(f"the model has no learnable buckets (landmarks='{state.config.landmarks}')")
    untrained = LearnableBuckets(list(state.edges), state.max_positions, buckets.temperature, buckets.assignment)
    return {"initial": list(state.edges), "learned": buckets.learned_edges(), "max_positions": state.max_positions,
            "boundaries_u": torch.sort(buckets.boundaries.detach().float().cpu()).values.tolist(),
            "effective_buckets": buckets.effective_buckets(),
            "initial_effective_buckets": untrained.to(buckets.boundaries.device).effective_buckets(),
            "num_buckets": state.config.num_buckets, "assignment": buckets.assignment,
            "temperature": buckets.temperature}


def position_bias_reach(model: nn.Module, length: int | None = None) -> dict | None:
    """How far the trained position bias rescales the adapters' low-rank updates: each adapter (gate w) scales its
    update at a token in bucket b by 1 + sigmoid(w) tanh(bias[b]), which is 1 at initialisation. `max_pct` is the
    largest distance of that factor from 1 over every adapter and bucket, in %; `spread_pct` the largest difference
    between two buckets' factors of one adapter, in % (what depends on position: a rescaling the same at every
    position is one the LoRA update itself can learn); `factor_range` its smallest and largest value; `table_max`
    the largest |bias[b]|. With `length` (a window of positions 0..length-1), `token_mean_pct`: that distance at
    the average token, over the window's positions and every adapter - what a metric averaged over tokens sees,
    where `max_pct` may come from a bucket that holds a single early position. None when the model has no
    position bias."""
    state = hylorada_state(model)
    if state.position_bias is None:
        return None
    gates = [torch.sigmoid(m.position_gate.detach().float().cpu()) for m in model.modules()
             if isinstance(m, HyLoRADALinear) and m.position_gate is not None]
    table = state.position_bias.table.detach().float().cpu()
    factor = 1 + torch.cat(gates)[:, None] * torch.tanh(table)[None, :]  # [adapters, buckets]
    out = {"max_pct": float((factor - 1).abs().max()) * 100,
           "spread_pct": float((factor.max(dim=1).values - factor.min(dim=1).values).max()) * 100,
           "factor_range": [float(factor.min()), float(factor.max())], "table_max": float(table.abs().max()),
           "adapters": len(gates)}
    if length is not None:
        buckets = bucketize(torch.arange(length), state.bucket_edges.cpu())
        share = torch.bincount(buckets, minlength=table.numel()).float() / length  # [buckets]: tokens' share
        out["token_mean_pct"] = float(((factor - 1).abs() * share[None, :]).sum(dim=1).mean()) * 100
    return out


def landmark_modules(model: nn.Module) -> list[nn.Module]:
    """The model's landmark modules (one after the final norm, or one per block for `per_layer`)."""
    state = hylorada_state(model)
    if state.layer_landmarks is not None:
        return list(state.layer_landmarks)
    return [state.landmarks] if state.landmarks is not None else []


@contextlib.contextmanager
def position_components_removed(model: nn.Module):
    """Within the block the model runs without its position bias and landmarks, exactly: every landmark scale and
    the bias table are zero (h + 0 * mix = h; 1 + sigmoid(w) tanh(0) = 1), restored afterwards. What a trained
    model's metric loses under this ablation is what those components contribute to it."""
    state = hylorada_state(model)
    held = [m.scale for m in landmark_modules(model)]
    if state.position_bias is not None:
        held.append(state.position_bias.table)
    saved = [p.detach().clone() for p in held]
    try:
        with torch.no_grad():
            for p in held:
                p.zero_()
        yield model
    finally:
        with torch.no_grad():
            for p, value in zip(held, saved, strict=True):
                p.copy_(value)


def boundary_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learnable bucket boundaries (empty unless landmarks='learnable_bucket')."""
    state = hylorada_state(model)
    buckets = getattr(state.landmarks, "buckets", None)
    return [buckets.boundaries] if buckets is not None else []


def drop_frozen_boundary_grads(model: nn.Module, step: int) -> bool:
    """Curriculum: before optimizer step `step` (0-based) < boundary_freeze_steps, drop the boundaries' grads.

    Call between backward and `optimizer.step()`. AdamW skips parameters whose grad is None (no update,
    no weight decay), so the boundaries stay at the fixed scheme's edges. Returns whether they were held.
    """
    state = hylorada_state(model)
    if step >= state.config.boundary_freeze_steps:
        return False
    for param in boundary_parameters(model):
        param.grad = None
    return True


def optimizer_rules(config: HyLoRADAConfig) -> list[GroupRule]:
    """Optimizer-group rules: the boundaries get `boundary_lr` and the position bias (its table and every adapter's
    gate) `bias_lr`, each without weight decay, where set."""
    rules = []
    if config.boundary_lr is not None:
        rules.append(GroupRule(pattern=r"\.buckets\.boundaries$", lr=config.boundary_lr, weight_decay=0.0))
    if config.bias_lr is not None and config.position_bias:
        rules.append(GroupRule(pattern=r"(\.position_gate|(^|\.)hylorada\.position_bias\.table)$", lr=config.bias_lr,
                               weight_decay=0.0))
    return rules


def auxiliary_loss(model: nn.Module) -> torch.Tensor:
    """boundary_diversity * penalty for bucket boundaries closing up (a per-step scalar; 0 when off).

    It is a mean, not a sum over tokens: a loop that sums token losses multiplies it by the token count.
    """
    state = hylorada_state(model)
    buckets = getattr(state.landmarks, "buckets", None)
    weight = state.config.boundary_diversity
    if buckets is None or weight == 0:
        return torch.zeros((), device=state.bucket_edges.device)
    return weight * buckets.diversity_penalty()


class HyLoRADAHooks(PaddedLM):
    """HyLoRADA's part of the training loop: the boundaries' optimizer group, the boundary-diversity penalty, and
    the curriculum that holds the boundaries for their first `boundary_freeze_steps` steps; batches padded with
    `pad_token_id`."""

    def __init__(self, config: HyLoRADAConfig, pad_token_id: int = 0):
        super().__init__(pad_token_id)
        self.config = config

    def param_rules(self) -> list[GroupRule]:
        return optimizer_rules(self.config)

    def aux_loss(self, state) -> torch.Tensor:
        return auxiliary_loss(state.model)

    def after_backward(self, state) -> None:
        drop_frozen_boundary_grads(state.model, state.step)
