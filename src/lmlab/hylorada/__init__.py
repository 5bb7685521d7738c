"""HyLoRADA: LoRA / rsLoRA / DoRA adapters with a learned position bias, landmarks and learnable buckets.

The method is specified in docs/hylorada.md; `apply_hylorada` turns a Hugging Face causal LM into a
HyLoRADA model in place, and the functions below save, load, merge and export its adapter.
"""

from lmlab.hylorada.config import HyLoRADAConfig
from lmlab.hylorada.extension import interpolate_position_embeddings, rope_scaling
from lmlab.hylorada.io import export_peft, load_adapter, merge_adapter, save_adapter
from lmlab.hylorada.layers import HyLoRADALinear
from lmlab.hylorada.model import (
    COMPONENTS,
    DEFAULT_TARGETS,
    HyLoRADAHooks,
    apply_hylorada,
    auxiliary_loss,
    boundary_parameters,
    component_param_counts,
    drop_frozen_boundary_grads,
    landmark_modules,
    learned_boundaries,
    optimizer_rules,
    position_bias_reach,
    position_components_removed,
)

__all__ = [
    "HyLoRADAHooks",
    "COMPONENTS",
    "DEFAULT_TARGETS",
    "HyLoRADAConfig",
    "HyLoRADALinear",
    "apply_hylorada",
    "auxiliary_loss",
    "boundary_parameters",
    "component_param_counts",
    "drop_frozen_boundary_grads",
    "export_peft",
    "interpolate_position_embeddings",
    "landmark_modules",
    "learned_boundaries",
    "load_adapter",
    "merge_adapter",
    "optimizer_rules",
    "position_bias_reach",
    "position_components_removed",
    "rope_scaling",
    "save_adapter",
]
