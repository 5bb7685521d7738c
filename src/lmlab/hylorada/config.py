"""The HyLoRADA config (docs/hylorada.md section 0: field names and defaults are part of the interface)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from lmlab.config import Section

# `constant` is a control (a learned constant vector: the landmark mix carries no position and no content) and
# `original_leaky` a diagnostic (the notes' pooling over the whole sequence, which sees future tokens: invalid).
LandmarkDesign = Literal["none", "original", "position_adaptive", "per_layer", "learnable_bucket", "constant",
                         "original_leaky"]


class HyLoRADAConfig(Section):
    """Which HyLoRADA parts are on, and their sizes. Every part can be switched off for ablations."""

    # Adapter (section 1)
    r: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(16, gt=0, description="LoRA alpha; scaling is alpha/r (LoRA) or alpha/sqrt(r) (rsLoRA)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the LoRA input (and the landmark mix)")
    use_rslora: bool = True
    use_dora: bool = False
    init_a: Literal["kaiming", "orthogonal"] = "kaiming"
    target_modules: Literal["all-linear"] | list[str] | None = Field(
        None, description="None = architecture default, 'all-linear', or module-name suffixes"
    )

    # Position bias and landmarks (sections 3-4)
    position_bias: bool = True
    bias_lr: float | None = Field(None, gt=0, description="learning rate of the position bias (table and gates); "
                                  "None: the run's")
    landmarks: LandmarkDesign = "position_adaptive"
    num_landmarks: int = Field(8, ge=0)
    num_buckets: int = Field(32, ge=2)
    bucket_spacing: Literal["log", "uniform"] = "log"
    max_positions: int | None = Field(None, ge=2, description="None = the run's max_length / the model's context")

    # Learnable bucketing (section 5)
    boundary_temperature: float = Field(0.1, gt=0)
    boundary_assignment: Literal["relative", "absolute", "straight_through"] = Field(
        "relative", description="temperature relative to each boundary's bucket width (as sharp as the fixed buckets "
        "at init), absolute on p / max_positions (the notes), or a straight-through hard assignment")
    boundary_lr: float | None = Field(None, gt=0)
    boundary_diversity: float = Field(0.0, ge=0)
    boundary_freeze_steps: int = Field(0, ge=0)

    # LongLoRA-style extras for the baseline study (section 1)
    train_embeddings: bool = False
    train_norms: bool = False

    @field_validator("target_modules")
    @classmethod
    def _targets_not_empty(cls, value):
        if isinstance(value, list):
            if not value:
                raise ValueError("an empty list matches nothing; use null for the architecture default or 'all-linear'")
            if any(not isinstance(s, str) or not s.strip() for s in value):
                raise ValueError("module-name suffixes must be non-empty strings")
        return value

    @model_validator(mode="after")
    def _landmarks_have_vectors(self):
        if self.landmarks != "none" and self.num_landmarks < 1:
            raise ValueError(f"landmarks='{self.landmarks}' needs num_landmarks >= 1 (got {self.num_landmarks})")
        if self.landmarks == "per_layer" and self.num_landmarks < 2:
            raise ValueError("landmarks='per_layer' puts num_landmarks/2 in every block: need num_landmarks >= 2")
        if self.max_positions is not None and self.num_buckets > self.max_positions:
            raise ValueError(f"num_buckets={self.num_buckets} is more than max_positions={self.max_positions}")
        return self

    @property
    def scaling(self) -> float:
        """s = alpha / sqrt(r) (rsLoRA) or alpha / r (LoRA)."""
        return self.alpha / (self.r**0.5) if self.use_rslora else self.alpha / self.r

    @property
    def uses_positions(self) -> bool:
        """Whether any part needs the per-token position context."""
        return self.position_bias or self.landmarks != "none"
