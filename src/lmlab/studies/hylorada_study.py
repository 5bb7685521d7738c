"""The three HyLoRADA studies (docs/hylorada.md section 8): `hylorada`, `landmarks`, `bucketing`.

One recipe: load the base (a cached tiny model pretrained at a short context, or any HF causal LM),
extend its context (RoPE scaling set before the model is built), apply one HyLoRADA configuration,
fine-tune with the one training loop at the run's `max_length` on packed windows, and evaluate. The `base`
row is the model before fine-tuning. Configurations are compared paired by seed; a seed fixes the data
sample, its order and the initialisation.

What makes a conclusion here attributable (see `lmlab.studies.attribution`):
- each component is judged against the configuration it is added to (bias and landmarks against `rslora`,
  learnable against fixed buckets, DoRA against `rslora`), never against `lora`, whose gap to `rslora` is
  rsLoRA's scaling;
- controls: landmarks mixed by a learned constant (`constant`: a constant vector added to the hidden states,
  no position and no content information) and a LoRA whose rank is raised until its trainable parameters
  reach the headline candidate's (`rslora-matched`); a component is credited only where it beats them; rsLoRA's
  scaling only where it beats LoRA at sqrt(r) times the learning rate (`lora-lr-scaled`), the step it gives;
- positive controls: the base retrieves planted facts within its pretraining context (and loses them beyond
  it), and an ablation removes the trained position components to measure what they contribute;
- one set of full windows, the same for every configuration and seed, for position-resolved perplexity;
- optionally (`lr_grid`, on in `paper` presets) each configuration's learning rate chosen on a separate tuning
  seed's validation split, since at one learning rate rsLoRA's update is sqrt(r) times LoRA's.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from lmlab import stats
from lmlab.data import generators
from lmlab.data.batching import packed_examples, tokenize_documents
from lmlab.data.sources import load_documents
from lmlab.engine import distributed as D
from lmlab.engine.hooks import Display
from lmlab.engine.optim import lr_factor
from lmlab.engine.train import TrainConfig, total_steps, train
from lmlab.errors import ConfigError, DataError
from lmlab.eval.harness import LmEvalConfig
from lmlab.eval.perplexity import evaluate_perplexity, positional_perplexity
from lmlab.eval.retrieval import retrieval_accuracy
from lmlab.hylorada import (
    HyLoRADAConfig,
    HyLoRADAHooks,
    apply_hylorada,
    component_param_counts,
    learned_boundaries,
    position_bias_reach,
    position_components_removed,
    rope_scaling,
    save_adapter,
)
from lmlab.hylorada.layers import HyLoRADALinear
from lmlab.hylorada.model import DEFAULT_TARGETS, component_of, hylorada_state
from lmlab.models.hf import context_length, load_causal_lm, load_config, load_tokenizer, prefix_token_id
from lmlab.studies import lr_search
from lmlab.studies.attribution import (
    RESOLUTION_PCT,
    effect_text,
    faster_reach_text,
    faster_reading,
    faster_room,
    per_seed_values,
    reach_clause,
)
from lmlab.studies.pretrain import PretrainConfig, pretrained_tiny
from lmlab.studies.report import (
    LINE_STYLES,
    MARKERS,
    change_cell,
    config_styles,
    curve_over_seeds,
    detail_curves,
    fmt,
    label_axes,
    line_plot,
    save_figure,
)
from lmlab.studies.rundir import TRAIN_STATE, RunDir
from lmlab.studies.runner import CellOutput, Study, StudyConfig
from lmlab.studies.setting import describe_data, describe_model, plural

LR_CHOSEN = "chosen per configuration"  # the Setting's learning rate under an lr search


@dataclass(frozen=True)
class Arm:
    """One configuration: the HyLoRADA fields it sets over the study's adapter settings (None: the base, not
    fine-tuned), its role in the study, and what a reader needs to know about it."""

    adapter: dict | None
    role: str = "ablation"
    note: str = ""
    invalid: bool = False
    freeze_lora: bool = False  # the adapters' B stays 0: only the position components train (a positive control)
    # rsLoRA trained first as its parent is (the position components held at their identity start), then frozen,
    # and the position components trained alone on top for the same budget: a positive control for a component
    # that acts through the LoRA update (the bias scales it per position, so on a frozen base it can do nothing)
    position_after_lora: bool = False
    matched_rank: bool = False  # rank raised until its trainable parameters reach the headline candidate's
    lr_scaled: bool = False  # trains at rsLoRA's learning rate x sqrt(r) (a control for rsLoRA's larger step)
    bias_lr_scale: float | None = None  # the position bias trains at this times the arm's learning rate (bias_lr)


LORA = {"use_rslora": False, "use_dora": False, "position_bias": False, "landmarks": "none"}
RSLORA = {**LORA, "use_rslora": True}
CONSTANT_NOTE = "the same landmark vectors mixed by a learned constant: a constant vector, no position or content"
MATCHED_NOTE = "rsLoRA with its rank raised until its trainable parameters reach the headline candidate's"
LEAK_NOTE = "pools over future tokens, as the notes' code did"
# The position bias moves about as far as its learning rate lets it (the reports' "How far the position bias
# trained"): an arm trains it at this many times the run's learning rate, so a null result at the run's rate can be
# told from one that a larger rate would not change either.
BIAS_FAST = 30
FAST_NOTE = (f"the position bias at {BIAS_FAST}x the learning rate (`bias_lr`), everything else as `rslora+bias`: does "
             "a bias that moves further help?")
LR_SCALED_NOTE = ("LoRA at sqrt(r) times rsLoRA's learning rate, so its first updates move the output as much as "
                  "rsLoRA's: a larger learning rate without rsLoRA's scaling")



LORA_STAGE = "lora-stage"  # a two-stage cell's first stage (`Arm.position_after_lora`): its checkpoints and curve

# Bucket boundaries act only through the position components they route (the bias table and the landmarks), which
# the ablation removes (`val_ppl_without_position`): how much those carry bounds what a bucketing scheme can change.
THROUGH_POSITION = {"without": "val_ppl_without_position",
                    "what": "the position components the buckets route (bias and landmarks)"}
# The landmarks trained alone on the frozen base: what they can do to the metric in this setting. (Their own ablation
# in the candidate is not a bound on the setting: it restates what the trained landmarks learned.)
LANDMARKS_ALONE = {"candidate": "landmarks-only", "parent": "base",
                   "what": "the landmarks trained alone on the frozen base"}
# How far the position bias trained (the most it rescales the adapters' update) next to how far its step size let it
BIAS_REACH = {"moved": "bias_rescale_pct", "allowed": "bias_rescale_allowed_pct", "typical": "bias_rescale_token_pct",
              "what": "the position bias rescales the adapters' update at its most rescaled position"}


def notes_scale(samples: int, epochs: float, landmarks: int, dataset: str | None = "wikitext-2-raw-v1") -> list[list]:
    """A claim's scale in the notes, as `report.with_scale` compares it with a run's configuration (the data only
    where the note names it)."""
    return [["model", "gpt2", "base model"], *([["dataset", dataset, "data"]] if dataset else []),
            ["num_train", f"{samples} samples", "packed training windows"], ["train.epochs", epochs, "epochs"],
            ["adapter.num_landmarks", landmarks, "landmarks"]]


def h1_claims(candidate: str) -> list[dict]:
    """Claim H1 (position-adaptive landmarks over no landmarks, PPL and LIM-PPL) for the study's landmark config."""
    setting = "GPT-2, WikiText-2, 500 train samples, 1 epoch, 8 landmarks"
    return [{"id": "H1", "claim": "position-adaptive landmarks: +9.19% PPL over the no-landmark baseline",
             "setting": setting, "candidate": candidate, "parent": "rslora", "claimed_pct": 9.19,
             "scale": notes_scale(500, 1, 8), "positive_control": LANDMARKS_ALONE},
            {"id": "H1", "claim": "position-adaptive landmarks: +9.32% LIM-PPL", "setting": "same",
             "candidate": candidate, "parent": "rslora", "metric": "lim_ppl", "claimed_pct": 9.32,
             "positive_control": LANDMARKS_ALONE}]


HYLORADA_ARMS: dict[str, Arm] = {
    "base": Arm(None, "base", "the extended base before fine-tuning"),
    "lora": Arm(LORA, "reference"),
    "rslora": Arm(RSLORA, "parent", "LoRA with rsLoRA's scaling alpha/sqrt(r): the parent of every component"),
    "lora-lr-scaled": Arm(LORA, "control", LR_SCALED_NOTE, lr_scaled=True),
    "rslora+dora": Arm({**RSLORA, "use_dora": True}),
    "rslora+bias": Arm({**RSLORA, "position_bias": True}),
    "rslora+bias-fast": Arm({**RSLORA, "position_bias": True}, note=FAST_NOTE, bias_lr_scale=BIAS_FAST),
    "rslora+landmarks": Arm({**RSLORA, "landmarks": "position_adaptive"}),
    "rslora+bias+landmarks": Arm({**RSLORA, "position_bias": True, "landmarks": "position_adaptive"}, "candidate",
                                 "HyLoRADA as recommended"),
    "rslora+bias+learnable_bucket": Arm({**RSLORA, "position_bias": True, "landmarks": "learnable_bucket"}),
    "rslora+constant": Arm({**RSLORA, "landmarks": "constant"}, "control", CONSTANT_NOTE),
    "rslora+bias+constant": Arm({**RSLORA, "position_bias": True, "landmarks": "constant"}, "control",
                                CONSTANT_NOTE),
    "rslora-matched": Arm(RSLORA, "control", MATCHED_NOTE, matched_rank=True),
    "landmarks-only": Arm({**RSLORA, "landmarks": "position_adaptive"}, "positive control",
                          "landmarks trained alone on the frozen base (LoRA held at 0): can they move the metric?",
                          freeze_lora=True),
    "rslora-frozen+bias": Arm({**RSLORA, "position_bias": True}, "positive control",
                              "rsLoRA trained as `rslora` is, then frozen, and the position bias trained alone on "
                              "top (the bias scales the LoRA update, so it needs one to act on): can it move the "
                              "metric?", position_after_lora=True),
    "lora+embed+norm": Arm({**LORA, "train_embeddings": True, "train_norms": True}, "peer",
                           "LongLoRA-style: also trains the (tied) embeddings and the norms"),
}
HYLORADA_COMPARISONS = [
    {"component": "rsLoRA scaling", "candidate": "rslora", "parent": "lora", "controls": ["lora-lr-scaled"]},
    {"component": "DoRA", "candidate": "rslora+dora", "parent": "rslora"},
    {"component": "position bias", "candidate": "rslora+bias", "parent": "rslora"},
    {"component": f"position bias at {BIAS_FAST}x the learning rate", "candidate": "rslora+bias-fast",
     "parent": "rslora"},
    {"component": "landmarks", "candidate": "rslora+landmarks", "parent": "rslora",
     "controls": ["rslora+constant", "rslora-matched"]},
    {"component": "bias + landmarks (HyLoRADA's new components)", "candidate": "rslora+bias+landmarks",
     "parent": "rslora", "controls": ["rslora+bias+constant", "rslora-matched"], "headline": True},
    {"component": "landmarks over the bias", "candidate": "rslora+bias+landmarks", "parent": "rslora+bias",
     "controls": ["rslora+bias+constant", "rslora-matched"]},  # as many trainable parameters: the same control
    {"component": "learnable buckets", "candidate": "rslora+bias+learnable_bucket", "parent": "rslora+bias+landmarks",
     "through": THROUGH_POSITION},
    {"component": "landmarks alone (positive control)", "candidate": "landmarks-only", "parent": "base",
     "positive_control": True},
    {"component": "position bias alone on a trained rsLoRA (positive control)", "candidate": "rslora-frozen+bias",
     "parent": "rslora", "positive_control": True},
    # its parent trains at the run's learning rate, which holds LoRA back here: a larger one may give the gain as well
    {"component": "embeddings + norms (not parameter-matched)", "candidate": "lora+embed+norm", "parent": "lora",
     "controls": ["lora-lr-scaled"], "unmatched": True,
     "control_notes": {"lora-lr-scaled": "LoRA alone at sqrt(r) times the learning rate, without the embeddings, the "
                                         "norms or their 118k parameters"}},
]
# rsLoRA's scaling is LoRA's at sqrt(r) times the step size: a larger learning rate alone may give its gain
LARGER_LR = {"candidate": "lora-lr-scaled", "parent": "lora",
             "what": "a larger learning rate (LoRA at sqrt(r) times the learning rate, no rsLoRA scaling)"}
HYLORADA_CLAIMS = [
    *h1_claims("rslora+landmarks"),
    {"id": "H3", "claim": "rsLoRA: +17.07% over a 69.00-PPL baseline", "setting": "comprehensive ablation",
     "candidate": "rslora", "parent": "lora", "claimed_pct": 17.07, "explanation": LARGER_LR},
    {"id": "H4", "claim": "DoRA: -5.62% (57.22 -> 60.44 PPL), degrades performance", "setting": "same",
     "candidate": "rslora+dora", "parent": "rslora", "claimed_pct": -5.62},
    {"id": "H5", "claim": "position bias: +2.11% with 64 parameters", "setting": "same",
     "candidate": "rslora+bias", "parent": "rslora", "claimed_pct": 2.11,
     "scale": [["component_params", 64, "position-bias parameters, table and gates"]],
     "reach": {**BIAS_REACH, "faster": "rslora+bias-fast"},
     "positive_control": {"candidate": "rslora-frozen+bias", "parent": "rslora",
                          "what": "the position bias trained alone on a trained, frozen rsLoRA"}},
    {"id": "H6", "claim": "rsLoRA + position bias + position-adaptive landmarks: +18.37% over baseline",
     "setting": "same", "candidate": "rslora+bias+landmarks", "parent": "lora", "claimed_pct": 18.37,
     "explanation": LARGER_LR},
    # the landmarks' own share of H6: H6 against H6 without them (the bias and rsLoRA stay), over H6's whole gain
    {"id": "H6", "claim": "... credited to the landmarks", "setting": "same", "kind": "credit",
     "candidate": "rslora+bias+landmarks", "parent": "rslora+bias", "total_parent": "lora"},
    {"id": "H7", "claim": "learnable bucketing: -2.26% vs fixed buckets (56.33 -> 57.60)", "setting": "same",
     "candidate": "rslora+bias+learnable_bucket", "parent": "rslora+bias+landmarks", "claimed_pct": -2.26,
     "through": THROUGH_POSITION},
]

LANDMARK_ARMS: dict[str, Arm] = {
    "base": Arm(None, "base", "the extended base before fine-tuning"),
    "rslora": Arm(RSLORA, "reference", "no landmarks"),
    "original": Arm({**RSLORA, "landmarks": "original"}),
    "position_adaptive": Arm({**RSLORA, "landmarks": "position_adaptive"}, "candidate"),
    "per_layer": Arm({**RSLORA, "landmarks": "per_layer"}),
    "constant": Arm({**RSLORA, "landmarks": "constant"}, "control", CONSTANT_NOTE),
    "rslora-matched": Arm(RSLORA, "control", MATCHED_NOTE, matched_rank=True),
    "landmarks-only": Arm({**RSLORA, "landmarks": "position_adaptive"}, "positive control",
                          "position-adaptive landmarks trained alone on the frozen base", freeze_lora=True),
    "original_leaky": Arm({**RSLORA, "landmarks": "original_leaky"}, "diagnostic", LEAK_NOTE, invalid=True),
}
LANDMARK_CONTROLS = ["constant", "rslora-matched"]
LANDMARK_COMPARISONS = [
    {"component": "position-adaptive landmarks", "candidate": "position_adaptive", "parent": "rslora",
     "controls": LANDMARK_CONTROLS, "headline": True},
    {"component": "original landmarks (causal pooling)", "candidate": "original", "parent": "rslora",
     "controls": LANDMARK_CONTROLS},
    {"component": "per-layer landmarks (causal pooling)", "candidate": "per_layer", "parent": "rslora",
     "controls": LANDMARK_CONTROLS},
    {"component": "landmarks alone (positive control)", "candidate": "landmarks-only", "parent": "base",
     "positive_control": True},
]
LEAK = {"candidate": "original_leaky", "parent": "original", "what": "the leak (pooling over future tokens)"}
LANDMARK_CLAIMS = [
    *h1_claims("position_adaptive"),
    {"id": "H2", "claim": "original landmark design: +4.72% PPL", "setting": "same", "candidate": "original",
     "parent": "rslora", "claimed_pct": 4.72, "explanation": LEAK},
    {"id": "H2", "claim": "original landmark design: +4.03% LIM-PPL", "setting": "same", "candidate": "original",
     "parent": "rslora", "metric": "lim_ppl", "claimed_pct": 4.03, "explanation": LEAK},
    {"id": "H2", "claim": "per-layer design: -1.19% PPL", "setting": "same", "candidate": "per_layer",
     "parent": "rslora", "claimed_pct": -1.19},
    {"id": "H2", "claim": "per-layer design: -3.17% LIM-PPL", "setting": "same", "candidate": "per_layer",
     "parent": "rslora", "metric": "lim_ppl", "claimed_pct": -3.17},
]

BUCKETING_ARMS: dict[str, Arm] = {
    "rslora": Arm(RSLORA, "parent", "no landmarks"),
    "fixed": Arm({**RSLORA, "landmarks": "position_adaptive"}, "reference", "landmarks with fixed log buckets"),
    "learnable": Arm({**RSLORA, "landmarks": "learnable_bucket"}, "candidate",
                     "learnable boundaries, as sharp as the fixed buckets at initialisation"),
    "learnable_notes": Arm({**RSLORA, "landmarks": "learnable_bucket", "boundary_assignment": "absolute"},
                           "ablation", "the notes' soft assignment: temperature 0.1 on p / max_positions, a "
                           "sigmoid tens of positions wide, which tells fewer buckets apart than the fixed scheme "
                           "already at initialisation: it changes resolution as well as learnability"),
    "constant": Arm({**RSLORA, "landmarks": "constant"}, "control", CONSTANT_NOTE),
    "rslora-matched": Arm(RSLORA, "control", MATCHED_NOTE, matched_rank=True),
}
BUCKETING_COMPARISONS = [
    {"component": "learnable buckets", "candidate": "learnable", "parent": "fixed", "headline": True,
     "through": {**THROUGH_POSITION, "what": "the landmarks the buckets route"}},
    {"component": "learnable buckets at the notes' temperature", "candidate": "learnable_notes", "parent": "fixed",
     "through": {**THROUGH_POSITION, "what": "the landmarks the buckets route"}},
    {"component": "landmarks with fixed buckets", "candidate": "fixed", "parent": "rslora",
     "controls": ["constant", "rslora-matched"]},
]
# The bucketing study trains no position bias: its buckets route the landmarks alone.
THROUGH_BUCKETED = {**THROUGH_POSITION, "what": "the landmarks the buckets route"}
BUCKETING_CLAIMS = [
    {"id": "H7", "claim": "learnable bucketing: -2.26% vs fixed buckets (56.33 -> 57.60)",
     "setting": "the notes' comprehensive ablation, where the buckets also route a position bias (this study "
     "trains none: its buckets route the landmarks alone)", "candidate": "learnable",
     "parent": "fixed", "claimed_pct": -2.26, "through": THROUGH_BUCKETED},
    {"id": "H7", "claim": "learnable bucketing: -2.26% vs fixed buckets, in the notes' own design (soft assignment, "
     "temperature 0.1 on p / max_positions)", "setting": "same", "candidate": "learnable_notes", "parent": "fixed",
     "claimed_pct": -2.26, "through": THROUGH_BUCKETED},
    {"id": "H7", "claim": "learnable bucketing expected +1-3% over fixed",
     "setting": "an expectation in the notes' next-steps and option-A documents, not a measurement",
     "candidate": "learnable", "parent": "fixed", "claimed_pct": 2.0, "through": THROUGH_BUCKETED,
     "claimed_text": "the expected 1-3% improvement (its middle, -2.00% val_ppl)"},
    {"id": "H8", "claim": "at 1 epoch / 200 samples all designs are within 0.1% (within noise)",
     "setting": "GPT-2, 4 landmarks", "kind": "null", "within_pct": 0.1,
     "scale": notes_scale(200, 1, 4, dataset=None),
     "through": {**THROUGH_BUCKETED, "what": "the landmarks"},
     "pairs": [["learnable", "fixed"], ["learnable_notes", "fixed"], ["fixed", "rslora"], ["learnable", "rslora"]]},
]

# How far the study extends a model's context (max_length over the context it was pretrained at): published
# extensions of pretrained models (position interpolation, YaRN) reach 32x; far beyond it the data for one window
# alone takes minutes to build and the attention of one window does not fit in memory.
MAX_EXTENSION = 32


def check_extension(max_length: int, context: int | None, what: str) -> None:
    """max_length within MAX_EXTENSION times the model's context (when it has a known one)."""
    if context is not None and max_length > MAX_EXTENSION * context:
        raise ConfigError(f"max_length={max_length} is more than {MAX_EXTENSION}x the {context}-token context of "
                          f"{what}, farther than the study extends a context; use max_length="
                          f"{MAX_EXTENSION * context} or less")


class HyloradaStudyConfig(StudyConfig):
    """A HyLoRADA study: base model, data, context, training and the shared adapter settings."""

    ALIASES = {
        "epochs": "train.epochs", "lr": "train.lr", "learning_rate": "train.lr", "batch_size": "train.batch_size",
        "grad_accum": "train.grad_accum", "num_landmarks": "adapter.num_landmarks", "r": "adapter.r",
        "alpha": "adapter.alpha", "num_buckets": "adapter.num_buckets", "boundary_lr": "adapter.boundary_lr",
        "bias_lr": "adapter.bias_lr",
        "boundary_temperature": "adapter.boundary_temperature", "boundary_diversity": "adapter.boundary_diversity",
        "boundary_freeze_steps": "adapter.boundary_freeze_steps",
        "boundary_assignment": "adapter.boundary_assignment",
    }

    model: str = Field("builtin", description="'builtin' (a cached tiny base) or an HF model dir / hub id")
    base: PretrainConfig = PretrainConfig(num_facts=2)
    dataset: str = Field("builtin", description="'builtin', wikitext-2-raw-v1, pg19, or local files")
    txt_documents: Literal["file", "blank_line"] = "file"
    max_length: int = Field(512, ge=16, description="fine-tuning and evaluation context")
    rope_scaling: Literal["none", "linear", "dynamic", "yarn"] = "linear"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="the frozen base weights as loaded and kept (the adapters train in float32 on a "
        "half-precision base); auto: bfloat16 on a GPU that supports it, else float32")
    num_train: int = Field(400, ge=1, description="training examples: full windows of max_length, documents packed")
    num_val: int = Field(40, ge=1, description="validation documents")
    num_facts: int = Field(6, ge=1, description="built-in documents: facts per document")
    value_digits: int = Field(4, ge=1, description="built-in documents: digits of a fact's value")
    retrieval_docs: int = Field(40, ge=0, description="built-in documents for retrieval by depth (0: skip)")
    positional_windows: int = Field(24, ge=0, description="full windows of max_length, the same for every "
                                    "configuration and seed, for per-decile perplexity and LIM-PPL (0: skip)")
    eval_batch_size: int = Field(8, ge=1)
    train: TrainConfig = TrainConfig(epochs=1, batch_size=8, lr=1e-3, warmup_ratio=0.05)
    adapter: HyLoRADAConfig = HyLoRADAConfig(dropout=0.0)
    lr_grid: list[float] | None = Field(None, min_length=2, description="choose each configuration's learning "
                                        "rate from these on a tuning seed's validation split before the seeds run")
    tuning_seed: int | list[int] = Field(7, description="data and initialisation seed(s) of the learning-rate "
                                         "search; several: the geometric mean of their validation perplexities")
    ablate_position: bool = Field(True, description="also evaluate each trained cell without its position bias and "
                                  "landmarks (what they contribute)")
    save_adapters: bool = True
    trust_remote_code: bool = False
    lm_eval: LmEvalConfig | None = Field(None, description="lm-evaluation-harness tasks every finished cell's final "
                                         "model is scored on (metrics lm_eval/<task>/<metric>); needs lmlab[lmeval]")

    @model_validator(mode="after")
    def _check(self):
        if self.model == "builtin" and self.max_length < self.base.model.context:
            raise ValueError(f"max_length={self.max_length} is shorter than the tiny base's pretraining context "
                             f"({self.base.model.context}); the study extends the context, it does not shrink it")
        if self.model == "builtin":
            try:
                check_extension(self.max_length, self.base.model.context, "the tiny base (base.model.context)")
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        lr_search.check_grid(self.lr_grid, self.tuning_seed, self.seeds)
        return self


def base_dtype(choice: str) -> str:
    """The dtype a base is loaded in for `dtype: choice` on this process's device."""
    if choice != "auto":
        return choice
    cuda = D.device().type == "cuda" and torch.cuda.is_bf16_supported()
    return "bfloat16" if cuda else "float32"


def parameter_dtypes(model: torch.nn.Module) -> dict[str, list[str]]:
    """The dtypes a fine-tuned model holds, as measured: its frozen and its trained parameters."""
    held: dict[str, set[str]] = {"frozen": set(), "trained": set()}
    for p in model.parameters():
        held["trained" if p.requires_grad else "frozen"].add(str(p.dtype).removeprefix("torch."))
    return {k: sorted(v) for k, v in held.items()}


@dataclass
class SeedData:
    train: list[dict]        # packed full windows of max_length
    val_docs: list[str]
    retrieval: list          # LongDocuments of ~max_length tokens
    retrieval_short: list    # LongDocuments within the pretraining context (positive control)


@dataclass
class _Context:
    cfg: HyloradaStudyConfig
    model_path: str
    tokenizer: object
    pretrained_context: int | None
    positional: list[list[int]]            # the full windows every cell is scored on
    matched_rank: int | None = None
    matched_params: dict = field(default_factory=dict)
    lrs: dict[str, float] = field(default_factory=dict)
    data: dict = field(default_factory=dict)  # seed -> SeedData


class HyloradaStudy(Study):
    config_cls = HyloradaStudyConfig
    primary_metric = "val_ppl"
    lower_is_better = True

    def __init__(self, name: str, arms: dict[str, Arm], reference: str, candidate: str, comparisons: list[dict],
                 claims: list[dict]):
        self.name = name
        self.arms = arms
        self._reference = reference
        self._candidate = candidate
        self._comparisons = comparisons
        self._claims = claims

    def configurations(self, cfg) -> list[str]:
        return list(self.arms)

    def reference(self, cfg) -> str:
        return self._reference

    def candidate(self, cfg) -> str:
        return self._candidate

    def comparisons(self, cfg) -> list[dict]:
        return self._comparisons

    def claims(self, cfg) -> list[dict]:
        return self._claims

    def setting(self, cfg) -> list[str]:
        a = cfg.adapter
        context = cfg.base.model.context if cfg.model == "builtin" else None
        data = describe_data(cfg.dataset, f"built-in long documents, {plural(cfg.num_facts, 'planted fact')} of "
                                          f"{plural(cfg.value_digits, 'digit')} each")
        named = ", ".join(a.target_modules) if isinstance(a.target_modules, list) else a.target_modules
        targets = named or (", ".join(DEFAULT_TARGETS["llama" if cfg.base.model.arch == "llama" else
                                                                 "gpt2"]) if cfg.model == "builtin" else
                                       "the architecture's default attention projections")
        lines = [f"Base model: {describe_model(cfg.model, cfg.base)}; its weights stay frozen "
                 f"({cfg.dtype}).",
                 f"Data: {data}; {cfg.num_train:,} training windows of {cfg.max_length} tokens (documents packed), "
                 f"{cfg.num_val} validation documents, {cfg.positional_windows} fixed windows for perplexity by "
                 f"position and LIM-PPL, {cfg.retrieval_docs} documents for retrieval by depth.",
                 f"Context: {cfg.max_length} tokens"
                 + (f", {cfg.max_length / context:g}x the base's {context}-token pretraining context"
                    if context else "")
                 + f" (RoPE scaling: {cfg.rope_scaling}).",
                 f"Training: {cfg.train.describe(lr=LR_CHOSEN if cfg.lr_grid else None, examples=cfg.num_train)}.",
                 f"Adapters: rank {a.r}, alpha {a.alpha:g} (scaling alpha/r for LoRA, alpha/sqrt(r) for rsLoRA), on "
                 f"{targets}; {a.num_landmarks} landmarks over "
                 f"{a.num_buckets} position buckets ({a.bucket_spacing} spacing).",
                 f"Seeds: {len(cfg.seeds)} ({', '.join(map(str, cfg.seeds))}), the same data and initialisation "
                 "for every configuration of a seed (paired; a configuration of another rank, such as "
                 "`rslora-matched`, draws adapter weights of its own)."]
        if cfg.lr_grid:
            grid = ", ".join(f"{v:g}" for v in cfg.lr_grid)
            tuning = lr_search.tuning_seeds(cfg.tuning_seed)
            lines.insert(4, f"Learning rate: each configuration's chosen from {grid} on tuning seed"
                            f"{'s' if len(tuning) > 1 else ''} {', '.join(map(str, tuning))} (see Learning rate).")
        return lines

    def roles(self, cfg) -> dict[str, dict]:
        return {name: {"role": arm.role, "note": arm.note, "invalid": arm.invalid} for name, arm in self.arms.items()}

    def param_match_ratio(self, cfg) -> float:
        return 1.5

    def stage_notes(self) -> dict[str, str]:
        return {name: "the position components train alone on the frozen rsLoRA" for name, arm in self.arms.items()
                if arm.position_after_lora}

    def table_metrics(self, cfg) -> list[str]:
        return ["val_ppl", "val_bpb", "lim_ppl", "retrieval_acc", "retrieval_acc_short", "train_time_s", "peak_mem_mb"]

    def change_metrics(self, cfg) -> list[str]:
        # retrieval is a proportion near chance: its relative change says little; the positive-control and depth
        # tables report it as it is
        return ["val_ppl", "lim_ppl"]

    # -----------------------------------------------------------------------------------------------

    def prepare(self, cfg: HyloradaStudyConfig, run: RunDir, display: Display) -> _Context:
        if cfg.model == "builtin":
            path = str(pretrained_tiny(cfg.base, display=display))
        else:
            path = cfg.model
        tokenizer = load_tokenizer(path, trust_remote_code=cfg.trust_remote_code)
        pretrained_context = context_length(load_config(path, cfg.trust_remote_code))
        check_extension(cfg.max_length, pretrained_context, f"model {path}")  # before any data is built
        if cfg.lm_eval is not None:  # lm-eval installed and every task known, before any cell trains
            from lmlab.eval.harness import task_manager

            task_manager(cfg.lm_eval.tasks, cfg.lm_eval.include_path)
        ctx = _Context(cfg, path, tokenizer, pretrained_context, positional_windows(cfg, tokenizer))
        configs = run.read_study()["configurations"]
        if any(self.arms[c].matched_rank for c in configs):
            ctx.matched_rank, ctx.matched_params = self._matched_rank(ctx)
        if cfg.lr_grid is not None:
            tuned = [c for c in configs if self.arms[c].adapter is not None and not self.arms[c].lr_scaled]
            if any(self.arms[c].lr_scaled or self.arms[c].position_after_lora for c in configs):
                # the learning rate an lr-scaled control derives its own from, and a two-stage arm's first stage
                # trains at (as `rslora` itself): tuned first
                tuned = ["rslora", *(c for c in tuned if c != "rslora")]
            ctx.lrs = self._tune_learning_rates(ctx, run, tuned, display)
        return ctx

    def _adapter_config(self, ctx: _Context, arm: Arm, lr: float | None = None) -> HyLoRADAConfig:
        """The arm's adapter settings over the study's; `lr`: the arm's learning rate (its bias_lr follows it)."""
        update = dict(arm.adapter)
        if arm.matched_rank:
            update["r"] = ctx.matched_rank
        if arm.bias_lr_scale is not None:
            update["bias_lr"] = arm.bias_lr_scale * (ctx.cfg.train.lr if lr is None else lr)
        return HyLoRADAConfig.model_validate(ctx.cfg.adapter.model_copy(update=update).model_dump())

    def _matched_rank(self, ctx: _Context) -> tuple[int, dict]:
        """The smallest LoRA rank whose trainable parameters reach the headline candidate's (counted on an empty
        'meta' copy of the model, so no weights are loaded)."""
        from transformers import AutoModelForCausalLM

        config = load_config(ctx.model_path, ctx.cfg.trust_remote_code)

        def trainable(adapter: HyLoRADAConfig) -> int:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, trust_remote_code=ctx.cfg.trust_remote_code)
            model = apply_hylorada(model, adapter, max_positions=ctx.cfg.max_length)
            return sum(p.numel() for p in model.parameters() if p.requires_grad)

        target = trainable(self._adapter_config(ctx, Arm(self.arms[self._candidate].adapter)))
        lora = self._adapter_config(ctx, Arm(RSLORA))
        per_rank = trainable(lora.model_copy(update={"r": 1}))
        rank = max(1, math.ceil(target / per_rank))
        return rank, {"rank": rank, "params": rank * per_rank, "candidate": self._candidate,
                      "candidate_params": target}

    def _data(self, ctx: _Context, seed: int) -> SeedData:
        if seed in ctx.data:
            return ctx.data[seed]
        ctx.data.clear()  # cells run seed by seed: keep one seed's data
        cfg, tok = ctx.cfg, ctx.tokenizer
        length_fn = partial(_token_count, tok)
        prefix = prefix_token_id(tok)
        end = tok.eos_token_id if tok.eos_token_id not in (None, prefix) else None
        budget = cfg.max_length - 8
        if cfg.dataset == "builtin":
            # Documents until their packed stream fills num_train windows (generation is sequential per seed, so
            # a longer list starts with the same documents).
            count = cfg.num_train + 2
            while True:
                docs = generators.long_documents(seed, count, budget, cfg.num_facts, length_fn, cfg.value_digits)
                examples = packed_examples(tokenize_documents([d.text for d in docs], tok), cfg.max_length, prefix,
                                           end_id=end)
                if len(examples) >= cfg.num_train:
                    break
                count = math.ceil(count * 1.25) + 2
            examples = examples[: cfg.num_train]
            val_docs = [d.text for d in generators.long_documents(seed + 500_000, cfg.num_val, budget, cfg.num_facts,
                                                                  length_fn, cfg.value_digits)]
        else:
            rng = random.Random(seed)
            packed = packed_examples(tokenize_documents(load_documents(cfg.dataset, "train",
                                                                       txt_documents=cfg.txt_documents), tok),
                                     cfg.max_length, prefix, end_id=end)
            if not packed:
                raise DataError(f"the train split of {cfg.dataset} has fewer tokens than max_length={cfg.max_length}; "
                                "give more training text or a smaller max_length")
            examples = rng.sample(packed, min(cfg.num_train, len(packed)))
            val_docs = validation_sample(cfg, seed)
        retrieval = generators.long_documents(seed + 900_000, cfg.retrieval_docs, budget, cfg.num_facts, length_fn,
                                              cfg.value_digits)
        short = []
        if ctx.pretrained_context is not None and ctx.pretrained_context < cfg.max_length:
            short = generators.long_documents(seed + 950_000, cfg.retrieval_docs, ctx.pretrained_context - 8,
                                              cfg.num_facts, length_fn, cfg.value_digits)
        ctx.data[seed] = SeedData(examples, val_docs, retrieval, short)
        return ctx.data[seed]

    def _load_base(self, ctx: _Context, extend: bool = True):
        cfg = ctx.cfg
        extend = (extend and cfg.rope_scaling != "none" and ctx.pretrained_context is not None
                  and cfg.max_length > ctx.pretrained_context)
        config_fn = partial(rope_scaling, max_length=cfg.max_length, kind=cfg.rope_scaling) if extend else None
        return load_causal_lm(ctx.model_path, dtype=base_dtype(cfg.dtype), config_fn=config_fn,
                              trust_remote_code=cfg.trust_remote_code)

    def _fine_tune(self, ctx: _Context, arm: Arm, data: SeedData, seed: int, lr: float,
                   cell_dir: Path | None, display: Display, lora_lr: float | None = None):
        """The extended base with this arm's adapter, trained on `data` (checkpointed into `cell_dir` when given);
        returns (model, adapter config, result). A two-stage arm (`position_after_lora`) trains its rsLoRA stage at
        `lora_lr` (`rslora`'s learning rate, so that stage is the `rslora` cell) and its position components at `lr`."""
        cfg = ctx.cfg
        adapter_cfg = self._adapter_config(ctx, arm, lr)
        model = self._load_base(ctx)
        D.seed_everything(seed)  # the adapter's initialisation depends on the seed
        model = apply_hylorada(model, adapter_cfg, max_positions=cfg.max_length)
        hooks = HyLoRADAHooks(adapter_cfg, ctx.tokenizer.pad_token_id)
        train_cfg = cfg.train.model_copy(update={"lr": lr})
        if arm.freeze_lora:
            for module in model.modules():
                if isinstance(module, HyLoRADALinear):
                    module.lora_A.requires_grad_(False)
                    module.lora_B.requires_grad_(False)
        first = None
        if arm.position_after_lora:
            # stage 1: everything but the position components (held at their start, where they are the identity),
            # i.e. the parent rsLoRA; stage 2 below: the position components alone on the frozen result
            state = hylorada_state(model)
            position = [p for n, p in model.named_parameters() if p.requires_grad and component_of(n, state) not in
                        (None, "lora", "dora_magnitude", "embeddings", "norms")]
            trained = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in position)]
            for param in position:
                param.requires_grad_(False)
            # its checkpoints inside the cell's TRAIN_STATE: a cell stopped in either stage resumes where it stopped,
            # and a recorded cell keeps neither stage's checkpoints (lmlab.studies.rundir)
            first = train(model, data.train, cfg.train.model_copy(update={"lr": lr if lora_lr is None else lora_lr}),
                          seed=seed, hooks=hooks,
                          checkpoint_dir=None if cell_dir is None else cell_dir / TRAIN_STATE / LORA_STAGE,
                          metrics_path=None if cell_dir is None else cell_dir / f"metrics-{LORA_STAGE}.jsonl",
                          display=display.named(f"{display.desc} (rsLoRA stage)"))
            for param in trained:
                param.requires_grad_(False)
            for param in position:
                param.requires_grad_(True)
        result = train(model, data.train, train_cfg, seed=seed, hooks=hooks,
                       checkpoint_dir=None if cell_dir is None else cell_dir / TRAIN_STATE,
                       metrics_path=None if cell_dir is None else cell_dir / "metrics.jsonl", display=display)
        if first is not None:  # what the cell cost and trained: both stages
            for param in trained:
                param.requires_grad_(True)
            result = dataclasses.replace(result, train_time_s=first.train_time_s + result.train_time_s,
                                         peak_mem_mb=max(first.peak_mem_mb, result.peak_mem_mb),
                                         steps=first.steps + result.steps, examples=first.examples + result.examples,
                                         tokens=first.tokens + result.tokens)
        return model, adapter_cfg, result

    def _lr(self, ctx: _Context, arm: Arm, config: str) -> float:
        """A configuration's learning rate: its tuned one (`lr_grid`), else train.lr; an lr-scaled control trains at
        rsLoRA's times sqrt(r), where LoRA's first updates (alpha/r) move the output as much as rsLoRA's
        (alpha/sqrt(r)) do."""
        if arm.lr_scaled:
            return ctx.lrs.get("rslora", ctx.cfg.train.lr) * math.sqrt(self._adapter_config(ctx, arm).r)
        return ctx.lrs.get(config, ctx.cfg.train.lr)

    def _positional(self, ctx: _Context, model) -> dict:
        """Per-decile perplexity and LIM-PPL on the study's shared full windows."""
        return positional_perplexity(model, ctx.positional, prefix_token_id(ctx.tokenizer), ctx.cfg.max_length,
                                     batch_size=ctx.cfg.eval_batch_size, pad_id=ctx.tokenizer.pad_token_id or 0)

    def _val_ppl(self, ctx: _Context, model, docs: list[str]) -> dict:
        return evaluate_perplexity(model, docs, ctx.tokenizer, ctx.cfg.max_length, batch_size=ctx.cfg.eval_batch_size,
                                   positional=False)

    def _tune_learning_rates(self, ctx: _Context, run: RunDir, configs: list[str], display: Display) -> dict:
        """Each configuration's learning rate: the grid value with the lowest validation perplexity on the tuning
        seed(s) (each its own training sample, initialisation and validation documents), by `lr_search.search`."""
        cfg = ctx.cfg
        tuning_data: dict[int, SeedData] = {}  # every tuning seed's data, built once (`_data` keeps one seed's)

        def score(config: str, lr: float, chosen: dict[str, float], seed: int) -> float:
            if seed not in tuning_data:
                tuning_data[seed] = self._data(ctx, seed)
            data = tuning_data[seed]
            model, _, _ = self._fine_tune(ctx, self.arms[config], data, seed, lr, None,
                                          display.named(f"lr search {config} lr {lr:g} seed {seed}"),
                                          lora_lr=chosen.get("rslora"))
            model.to(D.device())
            return self._val_ppl(ctx, model, data.val_docs)["ppl"]

        chosen = lr_search.search(run.root, cfg.lr_grid, cfg.tuning_seed, configs, score, display)
        ctx.data.clear()
        return chosen

    def run_cell(self, ctx: _Context, config: str, seed: int, cell_dir: Path, display: Display) -> CellOutput:
        cfg = ctx.cfg
        data = self._data(ctx, seed)
        arm = self.arms[config]
        details: dict = {}
        params = {"trainable_params": 0, "component_params": 0, "base_params_trained": 0}
        metrics: dict = {}
        if arm.adapter is not None:
            lr = self._lr(ctx, arm, config)
            model, adapter_cfg, result = self._fine_tune(ctx, arm, data, seed, lr, cell_dir, display,
                                                         lora_lr=ctx.lrs.get("rslora", cfg.train.lr))
            components = component_param_counts(model, trainable_only=True)
            params = {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                      "component_params": sum(v for k, v in components.items() if k != "lora"),
                      "base_params_trained": components["embeddings"] + components["norms"]}
            details.update(components=components, lr=lr, rank=adapter_cfg.r, dtypes=parameter_dtypes(model))
            metrics.update(train_time_s=result.train_time_s, peak_mem_mb=result.peak_mem_mb,
                           train_loss=result.final_loss,
                           train_tokens_per_s=result.tokens / max(result.train_time_s, 1e-9))
            reach = position_bias_reach(model, length=cfg.max_length)  # the windows: positions 0..max_length-1
            if reach is not None:  # how far the bias moved, next to how far its step size let it
                bias_lr = adapter_cfg.bias_lr or lr
                metrics.update(bias_rescale_pct=reach["max_pct"], bias_spread_pct=reach["spread_pct"],
                               bias_rescale_token_pct=reach["token_mean_pct"],
                               bias_rescale_allowed_pct=bias_rescale_allowed(cfg, len(data.train), bias_lr))
                details["position_bias"] = {**reach, "lr": bias_lr}
            if adapter_cfg.landmarks == "learnable_bucket":
                details["boundaries"] = {**learned_boundaries(model), **step_size_scale(cfg, adapter_cfg, result.steps,
                                                                                          len(data.train), lr)}
            if cfg.save_adapters and D.is_main():  # with the RoPE scaling it trained with (save_adapter records it)
                details["adapter_bytes"] = save_adapter(model, cell_dir / "adapter")["total_bytes"]
        else:
            model = self._load_base(ctx)
        device = D.device()
        model.to(device)
        ppl = self._val_ppl(ctx, model, data.val_docs)
        metrics.update(val_ppl=ppl["ppl"], val_bpb=ppl["bpb"], val_tokens=ppl["tokens"])
        if ctx.positional:
            pos = self._positional(ctx, model)
            metrics["lim_ppl"] = pos["lim_ppl"]
            details.update(decile_ppl=pos["decile_ppl"], decile_tokens=pos["decile_tokens"],
                           lim_tokens=pos["lim_tokens"])
        if arm.adapter is not None and cfg.ablate_position and _position_parts(arm.adapter):
            with position_components_removed(model):
                metrics["val_ppl_without_position"] = self._val_ppl(ctx, model, data.val_docs)["ppl"]
                if ctx.positional:
                    metrics["lim_ppl_without_position"] = self._positional(ctx, model)["lim_ppl"]
        self._retrieval(ctx, model, data, metrics, details, "")
        if arm.adapter is None and ctx.pretrained_context is not None and ctx.pretrained_context < cfg.max_length:
            details["pretrained_context"] = ctx.pretrained_context
            if cfg.rope_scaling == "none":  # the study's base is the base as pretrained: the same numbers
                metrics.update({f"{k}_native": metrics[k] for k in ("val_ppl", "retrieval_acc", "retrieval_acc_short")
                                if k in metrics})
                details.update({f"{k}_native": details[k] for k in ("retrieval_by_depth", "retrieval_counts")
                                if k in details})
            else:
                native = self._load_base(ctx, extend=False).to(device)  # the base as pretrained, no extension
                metrics["val_ppl_native"] = self._val_ppl(ctx, native, data.val_docs)["ppl"]
                self._retrieval(ctx, native, data, metrics, details, "_native")
        if arm.matched_rank:
            details["matched"] = ctx.matched_params
        if cfg.lm_eval is not None:  # the final model as it is (adapter unmerged), after every other metric
            from lmlab.eval.harness import cell_scores

            metrics.update(cell_scores(model, ctx.tokenizer, cfg.lm_eval))
        return CellOutput(metrics=metrics, details=details, params=params)

    def _retrieval(self, ctx: _Context, model, data: SeedData, metrics: dict, details: dict, suffix: str) -> None:
        """Retrieval by depth at max_length, and within the pretraining context (`_short`)."""
        batch = 2 * ctx.cfg.eval_batch_size
        if data.retrieval:
            ret = retrieval_accuracy(model, ctx.tokenizer, data.retrieval, ctx.cfg.max_length, batch_size=batch)
            metrics[f"retrieval_acc{suffix}"] = ret["retrieval_acc"]
            details[f"retrieval_by_depth{suffix}"] = ret["by_depth"]
            details[f"retrieval_counts{suffix}"] = ret["counts"]
            details[f"retrieval_outcomes{suffix}"] = ret["outcomes"]
            details[f"retrieval_distances{suffix}"] = ret["distances"]
        if data.retrieval_short:
            short = retrieval_accuracy(model, ctx.tokenizer, data.retrieval_short, ctx.pretrained_context,
                                       batch_size=batch)
            metrics[f"retrieval_acc_short{suffix}"] = short["retrieval_acc"]

    # -----------------------------------------------------------------------------------------------

    def report_sections(self, summary: dict, rows: list[dict], run: RunDir, record: dict) -> list[str]:
        lines: list[str] = []
        cfg = record["config"]
        configs = record["configurations"]
        # every table and legend marks a diagnostic as invalid
        names = {c: f"{c} (INVALID)" if summary["configs"].get(c, {}).get("invalid") else c for c in configs}
        ok = [{**r, "config": names.get(r["config"], r["config"])} for r in rows if r["status"] == "ok"]
        configs = [names[c] for c in configs]
        lines += _learning_rate_section(cfg, run, ok, summary)
        roles = {names[c]: e.get("role") for c, e in summary["configs"].items() if c in names}
        lines += _positive_control_section(ok, configs, cfg, names.get(summary["reference"], summary["reference"]))
        arms = {names[c]: self.arms[c] for c in record["configurations"] if c in self.arms}
        faster = [{**c, "candidate": names.get(c["candidate"], c["candidate"]),
                   "slow": names.get(_slow_twin(self.arms, c["candidate"]))} for c in summary.get("comparisons", [])
                  if c["candidate"] in self.arms and self.arms[c["candidate"]].bias_lr_scale is not None]
        parents = {}  # each candidate's parent in its first comparison
        for comp in summary.get("comparisons", []):
            parents.setdefault(names.get(comp["candidate"], comp["candidate"]), names.get(comp["parent"],
                                                                                         comp["parent"]))
        lines += _ablation_section(ok, configs, roles, {c: _position_parts(a.adapter) for c, a in arms.items()},
                                   {c: _how_alone(a) for c, a in arms.items()}, faster, parents)
        lines += _bias_reach_section(ok, configs, faster)
        if _decile_plot(ok, configs, run):
            counts = next((r["details"].get("decile_tokens") for r in ok if r["details"].get("decile_tokens")), None)
            lim = next((r["details"].get("lim_tokens") for r in ok if r["details"].get("lim_tokens")), None)
            lines += ["## Perplexity by position", "",
                      f"Per-decile perplexity over the same {cfg.get('positional_windows')} full windows of "
                      f"{cfg.get('max_length')} tokens for every configuration and seed (relative position in the "
                      "window); LIM-PPL is the middle half [0.25, 0.75)."
                      + (f" Tokens per decile: {', '.join(f'{c:,}' for c in counts)}; LIM-PPL covers {lim:,} tokens."
                         if counts and lim else "") + " See `plots/perplexity_by_decile.png`.",
                      *_first_decile_sentence(ok, [c for c in configs if roles.get(c) != "positive control"
                                                   and not c.endswith("(INVALID)")], cfg,
                                              _aside(configs, roles)), ""]
            drawn = _component_decile_plot(ok, configs, [{**c, "candidate": names.get(c["candidate"], c["candidate"]),
                                                          "parent": names.get(c["parent"], c["parent"])}
                                                         for c in summary.get("comparisons", [])], run)
            if drawn:
                lines += [f"Where each component acts along the window: `plots/component_by_decile.png` draws each of "
                          f"the {plural(len(drawn), 'comparison')} of the attribution table as its candidate's "
                          "per-decile change vs its parent, paired by seed, each on its own y axis (the panel above is "
                          "vs the reference, on one axis for all).", ""]
        depth_lines = _retrieval_table(ok, configs)
        if depth_lines:
            sparse = _retrieval_plot(ok, configs, run, 9 * 10 ** (cfg.get("value_digits", 4) - 1))
            lines += ["## Retrieval accuracy by depth of the planted fact (mean over seeds)", "", *depth_lines, ""]
            if sparse:
                lines += [f"The plot leaves out the decile{'s' if len(sparse) > 1 else ''} "
                          f"{', '.join(sparse)}: fewer than {MIN_DECILE_QUERIES} queries over the seeds, too few for a "
                          "mean to be read (one query moves it by more than 3 points).", ""]
        lines += _boundary_section(ok, run)
        comp = [(r["config"], r["details"].get("components")) for r in ok if r["details"].get("components")]
        if comp:
            seen = {}
            for name, parts in comp:
                seen.setdefault(name, parts)
            keys = sorted({k for parts in seen.values() for k in parts})
            lines += ["## Trainable parameters by component", "",
                      "| configuration | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
            lines += [f"| {n} | " + " | ".join(f"{p.get(k, 0):,}" for k in keys) + " |" for n, p in seen.items()]
            matched = next((r["details"]["matched"] for r in ok if r["details"].get("matched")), None)
            if matched:
                lines += ["", f"`rslora-matched` trains rank {matched['rank']} ({matched['params']:,} parameters) "
                          f"against `{matched['candidate']}`'s {matched['candidate_params']:,}: the smallest rank "
                          "with at least as many."]
            lines.append("")
        return lines


# ---------------------------------------------------------------------------------------------------
# Data


def _token_count(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def validation_sample(cfg: HyloradaStudyConfig, seed: int) -> list[str]:
    """A seed's validation documents from a data set. The tuning seed draws only documents that no study seed
    evaluates on, where the split has enough of them."""
    docs = load_documents(cfg.dataset, "validation", txt_documents=cfg.txt_documents)
    if cfg.lr_grid is not None and seed in lr_search.tuning_seeds(cfg.tuning_seed):
        used = {i for s in cfg.seeds for i in random.Random(s).sample(range(len(docs)), min(cfg.num_val, len(docs)))}
        unused = [i for i in range(len(docs)) if i not in used]
        if unused:
            return [docs[i] for i in random.Random(seed).sample(unused, min(cfg.num_val, len(unused)))]
    return [docs[i] for i in random.Random(seed).sample(range(len(docs)), min(cfg.num_val, len(docs)))]


def positional_windows(cfg: HyloradaStudyConfig, tokenizer) -> list[list[int]]:
    """The full windows of max_length tokens every cell is scored on for position-resolved perplexity: built-in
    documents from a fixed seed, or the first validation documents that fill a window (one window each)."""
    if cfg.positional_windows == 0:
        return []
    length = cfg.max_length
    if cfg.dataset == "builtin":
        docs = [d.text for d in generators.long_documents(777_777, cfg.positional_windows, length + 64, cfg.num_facts,
                                                          partial(_token_count, tokenizer), cfg.value_digits)]
    else:
        docs = load_documents(cfg.dataset, "validation", txt_documents=cfg.txt_documents)
    windows: list[list[int]] = []
    for start in range(0, len(docs), 64):
        for tokens in tokenize_documents(docs[start:start + 64], tokenizer):
            if len(tokens) >= length:
                windows.append(tokens[:length])
            if len(windows) == cfg.positional_windows:
                return windows
    return windows


def step_size_scale(cfg: HyloradaStudyConfig, adapter: HyLoRADAConfig, steps: int, num_examples: int,
                    lr: float) -> dict:
    """How far the boundaries could move from the optimizer's step size alone, in token positions: AdamW moves a
    parameter by about its learning rate per step, so sum(lr_t) is the drift of a gradient that always points the
    same way and sqrt(sum(lr_t^2)) that of a gradient of random sign (noise)."""
    rates = _learning_rates(cfg, num_examples, adapter.boundary_lr or lr, adapter.boundary_freeze_steps, steps)
    scale = adapter.max_positions or cfg.max_length
    return {"drift_consistent": sum(rates) * scale, "drift_random": math.sqrt(sum(r * r for r in rates)) * scale}


def _learning_rates(cfg: HyloradaStudyConfig, num_examples: int, lr: float, first: int, steps: int) -> list[float]:
    """The learning rate of optimizer steps first..steps-1 of a cell's schedule (peak `lr`)."""
    planned = total_steps(num_examples, cfg.train)
    warmup = cfg.train.warmup_steps if cfg.train.warmup_steps is not None else \
        int(round(cfg.train.warmup_ratio * planned))
    return [lr * lr_factor(s, warmup, planned, cfg.train.schedule, cfg.train.min_lr_ratio) for s in range(first, steps)]


def bias_rescale_allowed(cfg: HyloradaStudyConfig, num_examples: int, lr: float) -> float:
    """Where a gradient of one sign would take the position bias's rescaling of an adapter's update over one training
    run, in %: AdamW moves the gate w and each table entry (both 0 at the start) by about the learning rate per step
    whatever the gradient's size, so by S, the sum of the run's learning rates, and |sigmoid(w) tanh(bias)| to
    sigmoid(S) tanh(S). A reference, not a ceiling: where the gradient grows from step to step Adam's step exceeds
    the learning rate (up to about 3x)."""
    total = sum(_learning_rates(cfg, num_examples, lr, 0, total_steps(num_examples, cfg.train)))
    return 100 * (1 / (1 + math.exp(-total))) * math.tanh(total)


def _position_parts(adapter: dict | None) -> set[str]:
    """The position components an arm trains: "bias" and / or "landmarks"."""
    if adapter is None:
        return set()
    return ({"bias"} if adapter.get("position_bias") else set()) | (
        {"landmarks"} if adapter.get("landmarks", "none") != "none" else set())


def _how_alone(arm: Arm) -> str:
    """How a positive control trains its position components alone (for the ablation's sentence)."""
    if arm.position_after_lora:
        return "trained alone on a trained, frozen rsLoRA"
    return "trained alone on the frozen base" if arm.freeze_lora else "trained with the rest"


# ---------------------------------------------------------------------------------------------------
# Report sections


def _mean(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _metric_mean(rows: list[dict], config: str, metric: str) -> float | None:
    return _mean([r["metrics"].get(metric) for r in rows if r["config"] == config])


def _learning_rate_section(cfg: dict, run: RunDir, rows: list[dict], summary: dict) -> list[str]:
    lines = ["## Learning rate", ""]
    train_lr = cfg.get("train", {}).get("lr")
    rank = cfg.get("adapter", {}).get("r", 8)
    scaled = sorted({r["details"]["lr"] for r in rows if r["config"] == "lora-lr-scaled" and "lr" in r["details"]})
    scaled_lr = f"{scaled[0]:.3g}" if len(scaled) == 1 else "-"
    tuning = lr_search.read_search(run.root) if cfg.get("lr_grid") else None
    searched = lr_search.search_lines(tuning, "its own training sample, initialisation and validation documents, "
                                      "none of them a study seed's") if tuning else []
    if searched:
        if scaled:
            searched[0] += f" The control `lora-lr-scaled` trains at `rslora`'s times sqrt(r): {scaled_lr}."
        lines += searched
    else:
        others = f" (the control `lora-lr-scaled` at {scaled_lr}, below)" if scaled else ""
        said = f"Every configuration trains at lr = {train_lr:g}{others}."
        if {"lora", "rslora"} <= {r["config"] for r in rows}:  # only where the study compares the two scalings
            said += (f" At one learning rate rsLoRA's update (scaling alpha/sqrt(r)) is sqrt(r) = "
                     f"{math.sqrt(rank):.2f}x LoRA's (alpha/r) at r = {rank}, so `rslora` vs `lora` compares step "
                     "sizes as well as scalings.")
        lines.append(said + " `lr_grid=[...]` (on in the `paper` presets) chooses each configuration's learning rate "
                     "on a tuning seed first.")
    own, rest = {}, {}  # configurations whose position bias trains at a learning rate of its own (`bias_lr`)
    for r in rows:
        bias_lr = r["details"].get("position_bias", {}).get("lr")
        if bias_lr is not None and bias_lr != r["details"].get("lr"):
            own.setdefault(r["config"], set()).add(bias_lr)
            rest.setdefault(r["config"], set()).add(r["details"].get("lr"))

    def rates(values: set) -> str:
        return ", ".join(f"{v:.3g}" for v in sorted(v for v in values if v is not None)) or "-"

    if own:
        lines.append("The position bias trains at a learning rate of its own (`bias_lr`) in "
                     + ", ".join(f"`{c}` ({rates(v)}, everything else in it at {rates(rest[c])})"
                                 for c, v in own.items()) + ".")
    lines += _lr_control_sentences(summary)
    lines.append("")
    return lines


def _lr_control_sentences(summary: dict) -> list[str]:
    """What the lr-scaled control says about rsLoRA's gain over LoRA: a larger learning rate, or more."""
    comp = next((c for c in summary.get("comparisons", []) if c["candidate"] == "rslora" and c["parent"] == "lora"),
                None)
    control = next((k for k in (comp or {}).get("controls", []) if k["config"] == "lora-lr-scaled"), None)
    if control is None or not control["ran"]:
        return []
    measured = effect_text(control) if control["improvement_pct"] is not None else "no paired values"
    said = ("`lora-lr-scaled` trains LoRA at sqrt(r) times rsLoRA's learning rate, so that its first updates move the "
            "output as much as rsLoRA's: the control that tells rsLoRA's scaling from a larger learning rate. "
            f"`rslora` vs `lora-lr-scaled`: {measured}.")
    if comp["scenario"] == "explained-by-control":
        said += (" A larger learning rate accounts for rsLoRA's gain over LoRA here, so the scaling is not credited: "
                 "at one rank it changes the step size, which a tuned LoRA learning rate would change as well.")
    elif comp["credited"]:
        said += " rsLoRA beats the larger learning rate too: its gain here is more than a larger step."
    return ["", said]


def _selected_outcomes(rows: list[dict], config: str, beyond: int | None = None,
                       far: bool = True) -> dict[int, list[int]]:
    """{seed: the configuration's retrieval outcomes}, or with `beyond` (a context length) only the queries whose fact
    lies more than `beyond` tokens before its answer (`far`) or at most that (not `far`); seeds without the queries'
    distances are left out there."""
    out = {}
    for r in rows:
        if r["config"] != config or not r["details"].get("retrieval_outcomes"):
            continue
        outcomes = r["details"]["retrieval_outcomes"]
        if beyond is not None:
            distances = r["details"].get("retrieval_distances")
            if not distances or len(distances) != len(outcomes):
                continue
            outcomes = [o for o, d in zip(outcomes, distances, strict=True) if (d > beyond) == far]
        if outcomes:
            out[r["seed"]] = outcomes
    return out


def _retrieval_change(rows: list[dict], first: str, second: str, beyond: int | None = None,
                      far: bool = True) -> dict | None:
    """Recall of `first` minus `second`, paired. Each seed's retrieval documents are the same for every
    configuration, so two comparisons are possible:
    - over seeds (the test the report decides on, as for val_ppl): each seed's recall difference over its queries,
      a 95% t-interval and a paired t-test over the seeds - whether training the two again would differ;
    - over queries (`queries`: stats.paired_item_difference on the (seed, query) pairs): whether these trained models
      differ on these queries, the models taken as fixed - narrower, and not a statement about the training.
    With `beyond`, only the queries whose fact lies beyond (`far`) or within that many tokens of its answer."""
    from scipy import stats as scipy_stats

    per_seed = [_selected_outcomes(rows, c, beyond, far) for c in (first, second)]
    seeds = sorted(s for s in per_seed[0] if per_seed[0][s] and per_seed[1].get(s)
                   and len(per_seed[0][s]) == len(per_seed[1][s]))
    if not seeds:
        return None
    diffs = [sum(per_seed[0][s]) / len(per_seed[0][s]) - sum(per_seed[1][s]) / len(per_seed[1][s]) for s in seeds]
    shared = max(diffs) - min(diffs) < 1e-12  # the same on every seed: one measurement, no interval
    ci = None if shared else stats.t_interval(diffs)
    p_value = None if shared or len(diffs) < 2 else float(scipy_stats.ttest_1samp(diffs, 0.0).pvalue)
    a, b = ([v for s in seeds for v in outcomes[s]] for outcomes in per_seed)
    return {"difference": sum(diffs) / len(diffs), "ci95": ci, "p_value": p_value, "seeds": len(seeds),
            "queries_per_seed": sorted({len(per_seed[0][s]) for s in seeds}),
            "queries": stats.paired_item_difference([a], [b])}


def _pts(value: float) -> str:
    """Points (x 100) with one decimal - or two where one would print a bound that is not 0 as 0.0."""
    points = 100 * value
    return f"{points:+.2f}" if points != 0 and abs(points) < 0.05 else f"{points:+.1f}"


def _points(change: dict | None, all_seeds: int | None = None) -> str:
    if change is None:
        return "-"
    d = change["difference"]
    if change["ci95"] is None:
        said = (f"{_pts(d)}, the same on every seed" if change["seeds"] > 1 else f"{_pts(d)} (one seed)")
    else:
        lo, hi = change["ci95"]
        said = f"{_pts(d)} [{_pts(lo)}, {_pts(hi)}] (p={change['p_value']:.2g})"
    if all_seeds is not None and change["seeds"] < all_seeds:
        said += f" ({change['seeds']} seeds)"
    return said + f"; queries p={change['queries']['p_value']:.2g}"


def _significant(change: dict | None) -> bool:
    """Significant over seeds: the 95% t-interval of the per-seed differences excludes 0."""
    return change is not None and change["ci95"] is not None and (change["ci95"][0] > 0 or change["ci95"][1] < 0)


def _distance_sentence(rows: list[dict], configs: list[str], context: int | None, values: int) -> str:
    """Recall split by how far each fact lies before its answer: beyond the base's pretraining context, where recovering
    recall is what a context extension is for, and within it - the base and the range over `configs`, how many of
    them recall significantly more than the base beyond it (paired over seeds), and how many recall more than
    guessing one of `values` equally likely values does there; "" without the queries' distances."""
    if not context:
        return ""
    chance = 1 / values

    def span_pct(shares: list[float]) -> str:  # '7%-11%', or '7%' where they print alike
        low, high = f"{min(shares):.0%}", f"{max(shares):.0%}"
        return low if low == high else f"{low}-{high}"

    def recall(config: str, far: bool) -> float | None:
        chosen = _selected_outcomes(rows, config, context, far)
        return sum(sum(v) / len(v) for v in chosen.values()) / len(chosen) if chosen else None

    base_far, base_near = recall("base", True), recall("base", False)
    far = {c: recall(c, True) for c in configs}
    near = {c: recall(c, False) for c in configs}
    far = {c: v for c, v in far.items() if v is not None}
    if base_far is None or base_near is None or not far:
        return ""
    counts = sorted({len(v) for v in _selected_outcomes(rows, "base", context, True).values()})
    near_counts = sorted({len(v) for v in _selected_outcomes(rows, "base", context, False).values()})
    span = lambda ns: f"{ns[0]:,}" if len(ns) == 1 else f"{ns[0]:,}-{ns[-1]:,}"  # noqa: E731
    changes = {c: _retrieval_change(rows, c, "base", context, True) for c in far}
    up = [c for c, change in changes.items() if _significant(change) and change["difference"] > 0]

    def above_guessing(config: str) -> bool:  # the pooled far queries' 95% Wilson interval lies above chance
        chosen = _selected_outcomes(rows, config, context, True)
        hits, n = sum(sum(v) for v in chosen.values()), sum(len(v) for v in chosen.values())
        return n > 0 and stats.wilson_interval(hits, n)[0] > chance

    recalled = [c for c in far if above_guessing(c)]
    near_vals = [v for v in near.values() if v is not None]
    named = f"{', '.join(f'`{c}`' for c in up)}; " if 0 < len(up) <= 5 else ""
    # one test per configuration, none corrected for how many there are: which ones pass says little of their order
    uncorrected = "; a test per configuration, not corrected for their number: the list is no ranking" \
        if len(up) > 1 and named else ""
    said = (f"Split by how far each fact lies before its answer (tokens from the fact to the answer): beyond the "
            f"base's {context}-token pretraining context ({span(counts)} queries per seed) the fine-tuned "
            f"configurations recall {span_pct(list(far.values()))} against the base's "
            f"{base_far:.0%}; {len(up)} of {len(far)} {'recalls' if len(up) == 1 else 'recall'} significantly more "
            f"than the base there ({named}paired over seeds{uncorrected}), and {len(recalled)} of {len(far)} more "
            f"than guessing would (1 in {values:,}: their "
            "pooled queries' 95% Wilson interval above it).")
    if near_counts and near_vals:
        said += (f" Facts within {context} tokens of their query in these long documents "
                 f"({span(near_counts)} queries per seed): they recall {span_pct(near_vals)} against the base's "
                 f"{base_near:.0%}.")
    if not recalled:
        said += (" What fine-tuning recovered here is recall of facts near their query; beyond the pretraining "
                 "context no configuration recalls more than guessing gets"
                 + (", so a gain over the base there is in how often a guess lands, not recall" if up else "") + ".")
    return said


def _decile_values(rows: list[dict], config: str, decile: int) -> dict[int, float]:
    """{seed: perplexity over position decile `decile` (0 the first, -1 the last)} of `config`'s cells."""
    return {r["seed"]: r["details"]["decile_ppl"][decile] for r in rows if r["config"] == config
            and r["details"].get("decile_ppl")}


def _first_decile(rows: list[dict], config: str) -> dict[int, float]:
    """{seed: perplexity over the window's first position decile} of `config`'s cells that recorded it."""
    return _decile_values(rows, config, 0)


def _same_adapters(rows: list[dict], candidate: str, parent: str) -> bool:
    """Whether `candidate` with its position components removed scores `parent`'s val_ppl on every seed (to 1e-6
    relative): its adapters are then `parent`'s, and what it changes is its position components' own doing."""
    without = {r["seed"]: r["metrics"].get("val_ppl_without_position") for r in rows if r["config"] == candidate}
    ref = {r["seed"]: r["metrics"].get("val_ppl") for r in rows if r["config"] == parent}
    return bool(without) and set(without) <= set(ref) and all(
        v is not None and ref[s] is not None and abs(v - ref[s]) <= 1e-6 * abs(ref[s]) for s, v in without.items())


def _acts_by_position(rows: list[dict], candidate: str, parent: str) -> tuple[str, bool]:
    """(the clause, whether the changes are the position components' own). Where `candidate` changes perplexity
    significantly vs `parent` (paired by seed) over the window's first or last position decile (where log spacing
    puts its narrowest and widest buckets), the clause says so, both ends given, with whether val_ppl over the whole
    window moved, and whose doing the changes are: the position components' own where `candidate` with them removed
    scores `parent`'s val_ppl on every seed (`_same_adapters`: its other weights are `parent`'s), else possibly also
    the weights trained beside them. Two deciles fixed in advance, not a search over ten; ("", False) where neither
    moved - a null on val_ppl is then not hiding opposite changes at the window's ends. No closing full stop."""
    ends = {}
    for name, decile in (("first", 0), ("last", -1)):
        change = stats.paired_relative_change(_decile_values(rows, candidate, decile),
                                              _decile_values(rows, parent, decile))
        if change and change.get("ci95"):
            ends[name] = change
    moved = {n: ch for n, ch in ends.items() if ch["ci95"][0] > 0 or ch["ci95"][1] < 0}
    if not moved:
        return "", False

    def way(ch):
        ci = ch["ci95"]
        return ", for the worse" if ci[0] > 0 else ", for the better" if ci[1] < 0 else ""
    said = f"`{candidate}` changes perplexity vs `{parent}` " + ", and ".join(
        f"over the window's {n} position decile by {change_cell(ch)}{way(ch)}" for n, ch in ends.items())
    said += " (paired by seed; the two end deciles, fixed in advance, uncorrected)"
    if len(moved) == 2 and (moved["first"]["ci95"][0] > 0) != (moved["last"]["ci95"][0] > 0):
        overall = stats.paired_relative_change(
            {r["seed"]: r["metrics"]["val_ppl"] for r in rows if r["config"] == candidate},
            {r["seed"]: r["metrics"]["val_ppl"] for r in rows if r["config"] == parent})
        ci = overall and overall.get("ci95")
        said += (": changes of opposite sign, while val_ppl over the whole window shows no significant change"
                 if ci and ci[0] <= 0 <= ci[1] else ": changes of opposite sign")
    own = _same_adapters(rows, candidate, parent)
    said += (f"; with them removed it scores `{parent}`'s val_ppl on every seed, so these are the position "
             "components' own doing" if own else
             f"; with them removed it does not score `{parent}`'s val_ppl exactly, so these may include the weights "
             "trained beside them")
    return said, own


def _aside(configs: list[str], roles: dict[str, str]) -> str:
    """' (positive controls and diagnostics aside)', naming only what the run has of them, for a sentence about the
    fine-tuned configurations; '' where it has neither."""
    kinds = [k for k, present in (("positive controls", any(roles.get(c) == "positive control" for c in configs)),
                                  ("diagnostics", any(c.endswith("(INVALID)") for c in configs))) if present]
    return f" ({' and '.join(kinds)} aside)" if kinds else ""


def _first_decile_sentence(rows: list[dict], configs: list[str], cfg: dict, aside: str = "") -> list[str]:
    """Where the first position decile lies within the base's pretraining context: what fine-tuning did to perplexity
    there, each fine-tuned configuration of `configs` (the caller leaves out positive controls and diagnostics) vs
    the base, paired by seed (the window's first tokens see no more context than the base was trained on)."""
    context = next((r["details"].get("pretrained_context") for r in rows if r["config"] == "base"), None)
    span = math.ceil(cfg.get("max_length", 0) / 10)  # positions p with 10 p / max_length < 1
    base = _first_decile(rows, "base")
    if not context or not base or span > context:  # (the first decile's last position, span - 1, < context)
        return []
    changes = {}
    for c in configs:
        if c == "base":
            continue
        first = _first_decile(rows, c)
        change = stats.paired_relative_change(first, base) if first else None
        if change is not None and change.get("ci95"):
            changes[c] = change
    if not changes:
        return []
    worse = [c for c, ch in changes.items() if ch["ci95"][0] > 0]
    better = [c for c, ch in changes.items() if ch["ci95"][1] < 0]
    deltas = sorted(ch["delta_pct"] for ch in changes.values())
    most = max(changes, key=lambda c: changes[c]["delta_pct"])
    said = (f"In the first decile (positions 0-{span - 1}, within the base's {context}-token pretraining context) the "
            f"fine-tuned configurations{aside} change perplexity by "
            f"{deltas[0]:+.2g}% to {deltas[-1]:+.2g}% against the "
            f"base's (paired by seed; the most: `{most}` {change_cell(changes[most])}): {len(worse)} of "
            f"{len(changes)} significantly raise it, {len(better)} significantly lower it.")
    if worse:
        said += (" This fine-tuning costs perplexity on the window's first tokens, where the base needed no context "
                 "extension - a cost the overall val_ppl does not show.")
    return ["", said]


def _short_recall_sentence(rows: list[dict], configs: list[str], context: int | None) -> str:
    """Whether fine-tuning kept the base's recall within its pretraining context: the configurations whose mean recall
    there falls more than a point below the base's, each with the per-seed difference's 95% t-interval; "" where
    the base has no such recall."""
    base = {r["seed"]: r["metrics"].get("retrieval_acc_short") for r in rows if r["config"] == "base"}
    if not any(v is not None for v in base.values()):
        return ""
    lost, every = [], []
    for c in configs:
        pairs = [(r["metrics"]["retrieval_acc_short"], base[r["seed"]]) for r in rows if r["config"] == c
                 and r["metrics"].get("retrieval_acc_short") is not None and base.get(r["seed"]) is not None]
        diffs = [a - b for a, b in pairs]
        if diffs and sum(diffs) / len(diffs) < -0.01:
            mean, ci = sum(diffs) / len(diffs), stats.t_interval(diffs)
            spread = (f"{_pts(mean)} points [{_pts(ci[0])}, {_pts(ci[1])}] over {len(diffs)} seeds, "
                      + ("significant" if ci[1] < 0 else "not significant") if ci else f"{_pts(mean)} points, one seed")
            if len(diffs) > 1 and all(d < 0 for d in diffs) and not (ci and ci[1] < 0):
                bases = sorted({f"{b:.2f}" for _, b in pairs})
                spread += (f"; lower on every seed: {', '.join(f'{a:.2f}' for a, _ in pairs)} against the base's "
                           f"{', '.join(bases)}")
                every.append(c)
            lost.append((c, bool(ci) and ci[1] < 0, f"`{c}` ({spread})"))
    where = (f"in documents within the pretraining context ({context} tokens)" if context else
             "in documents within the pretraining context")
    if not lost:
        return f"Every fine-tuned configuration keeps the base's recall {where} (within a point)."
    shown = [c for c, significant, _ in lost if significant]
    them = "these configurations" if len(lost) > 1 else "this configuration"
    if shown:
        return (f"Recall {where} falls below the base's in {', '.join(t for _, _, t in lost)} "
                f"(significantly in {len(shown)} of {len(lost)}): fine-tuning at the longer context may cost {them} "
                "recall the base had, which their val_ppl does not show.")
    if every:
        named = ", ".join(f"`{c}`" for c in every)
        return (f"Recall {where} is lower than the base's in {', '.join(t for _, _, t in lost)}: the trained models "
                f"of {named} lost recall the base had on every seed, but over this many seeds the interval holds 0, "
                "so whether such training costs recall on average, this run cannot tell.")
    return (f"Recall {where} is lower than the base's in {', '.join(t for _, _, t in lost)}: whether fine-tuning at "
            f"the longer context costs {them} recall the base had, this run cannot tell.")


def _positive_control_section(rows: list[dict], configs: list[str], cfg: dict, reference: str) -> list[str]:
    """Can long-context behaviour show at all here? The base within and beyond its pretraining context; then each
    fine-tuned configuration's recall, paired over the same queries against the base and the reference."""
    base = [r for r in rows if r["config"] == "base"]
    short = _metric_mean(base, "base", "retrieval_acc_short_native")
    if short is None:
        return []
    context = next((r["details"].get("pretrained_context") for r in base), None)
    far = _metric_mean(base, "base", "retrieval_acc_native")
    start = _metric_mean(base, "base", "retrieval_acc")
    extension = cfg.get("rope_scaling", "none")
    said = (f"The base as pretrained recalls {short:.0%} of the planted facts in documents within its pretraining "
            f"context ({context} tokens) and {far:.0%} in documents of {cfg['max_length']} tokens without a context "
            "extension")
    said += "." if extension == "none" else (f", {start:.0%} with {extension} RoPE scaling, the extension every "
                                             "fine-tuned configuration starts from.")
    digits = cfg.get("value_digits", 4)
    chance = f"1 in {9 * 10 ** (digits - 1):,}"
    lines = ["## Positive controls: can long-context retrieval show here?", "",
             said + f" (Mean over seeds; guessing a {digits}-digit value is right {chance} times.)"]
    if short < 0.5:
        lines.append("The positive control FAILS: the base does not recall planted facts even within its pretraining "
                     "context, so retrieval cannot separate the configurations in this run.")
    elif start < short - 0.1:
        lines.append("The positive control holds: recall is measurable in documents within the pretraining context "
                     "and lost in longer ones, so fine-tuning at the longer context has something to recover (by "
                     "depth and by distance below).")
    else:
        lines.append("The base keeps most of its recall beyond its pretraining context in the extension the "
                     "configurations start from, so retrieval differences here say little about context extension.")
    fine_tuned = [c for c in configs if c != "base" and _metric_mean(rows, c, "retrieval_acc") is not None]
    if fine_tuned:
        after = {c: _metric_mean(rows, c, "retrieval_acc") for c in fine_tuned}
        highest = max(after, key=after.get)
        vs_base = {c: _retrieval_change(rows, c, "base") for c in fine_tuned}
        vs_ref = {c: _retrieval_change(rows, c, reference) if c != reference else None for c in fine_tuned}
        lines.append(f"After fine-tuning at {cfg['max_length']} tokens, recall at that length is "
                     f"{min(after.values()):.0%}-{max(after.values()):.0%} across configurations (highest mean: "
                     f"`{highest}`), against {start:.0%} before; the depth table below shows where it changed.")
        tested = [c for c in fine_tuned if vs_base[c] is not None and not c.endswith("(INVALID)")]
        seeds = max((vs_base[c]["seeds"] for c in tested), default=0)
        if tested:
            sizes = sorted({n for c in tested for n in vs_base[c]["queries_per_seed"]})
            queries = f"{sizes[0]:,}" if len(sizes) == 1 else f"{sizes[0]:,}-{sizes[-1]:,}"
            up = [c for c in tested if _significant(vs_base[c]) and vs_base[c]["difference"] > 0]
            down = [c for c in tested if _significant(vs_base[c]) and vs_base[c]["difference"] < 0]
            apart = [c for c in tested if _significant(vs_ref[c])]
            said = (f"Paired by seed (each seed's recall over its {queries} queries, the same queries for every "
                    f"configuration; a 95% t-interval over the {seeds} seeds, as for val_ppl), {len(up)} of "
                    f"{len(tested)} fine-tuned configurations recall significantly more than the base" + (
                        f" and {len(down)} significantly less ({', '.join(f'`{c}`' for c in down)})" if down else "")
                    + "; ")
            others = [c for c in tested if c != reference and vs_ref[c] is not None]
            if others:
                higher = [c for c in apart if vs_ref[c]["difference"] > 0]
                lower = [c for c in apart if vs_ref[c]["difference"] < 0]
                names = lambda cs: ", ".join(f"`{c}`" for c in cs)  # noqa: E731
                if not apart:
                    said += (f"none of {len(others)} differs significantly from `{reference}`, so retrieval does not "
                             "separate the configurations at this scale.")
                else:
                    rest = len(others) - len(apart)
                    parts = ([f"{len(higher)} of {len(others)} recall significantly more"] if higher else []) + (
                        [f"{len(lower)} of {len(others)} significantly less ({names(lower)})"] if lower else [])
                    said += (f"against `{reference}`, " + " and ".join(parts)
                             + (f"; {rest} {'does' if rest == 1 else 'do'} not differ significantly from it"
                                if rest else "") + ".")
            else:
                said = said[:-2] + "."
            if not up:
                fixed = [c for c in tested if vs_base[c]["queries"]["p_value"] < 0.05
                         and vs_base[c]["queries"]["difference"] > 0]
                said += (f" Over {seeds} seed{'s' if seeds != 1 else ''}, then, this run does not show that "
                         f"fine-tuning at {cfg['max_length']} tokens recovers recall"
                         + (f" (over the pooled queries, {len(fixed)} of these trained models recall more than the "
                            "base, but the gain varies too much from seed to seed to be told from 0: more seeds "
                            "would tell)" if fixed else "") + ".")
            lines.append(said)
        split = _distance_sentence(rows, [c for c in fine_tuned if not c.endswith("(INVALID)")], context,
                                   9 * 10 ** (digits - 1))
        if split:
            lines.append(split)
        kept = _short_recall_sentence(rows, [c for c in fine_tuned if not c.endswith("(INVALID)")], context)
        if kept:
            lines.append(kept)
        columns = ["retrieval at " + f"{cfg['max_length']} tokens",
                   f"retrieval in {context}-token documents" if context else "retrieval in short documents"]
        if any(vs_base.values()):
            columns += ["vs base, points [95% CI] (p); queries p", f"vs `{reference}`, points [95% CI] (p); queries p"]
        lines += ["", "| configuration | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
        for c in ["base", *fine_tuned]:
            cells = [fmt(_metric_mean(rows, c, "retrieval_acc")), fmt(_metric_mean(rows, c, "retrieval_acc_short"))]
            if any(vs_base.values()):
                cells += [_points(vs_base.get(c), seeds), _points(vs_ref.get(c), seeds)]
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        if any(vs_base.values()):
            lines += ["", "Points: recall of the configuration minus the other's, x 100, the mean of the per-seed "
                      "differences (each seed's retrieval documents are shared by every configuration) with a 95% "
                      "t-interval and a paired t-test over the seeds: whether training the two again would differ, "
                      "the test the sentences above count. `queries p`: a sign-flip permutation test over the "
                      "pooled (seed, query) pairs, the trained models taken as fixed - whether these models differ "
                      "on these queries, which says nothing about seed-to-seed variation of the training."]
    lines.append("")
    return lines


NEGLIGIBLE_PCT = 0.1  # a change of val_ppl below this (in %) is negligible in the ablation's sentences


def _ablation_section(rows: list[dict], configs: list[str], roles: dict[str, str],
                      parts: dict[str, set[str]] | None = None, how: dict[str, str] | None = None,
                      faster: list[dict] = (), parents: dict[str, str] | None = None) -> list[str]:
    """What the trained position components contribute: each cell evaluated with them removed. `parts` names each
    configuration's position components ("bias", "landmarks"), so that a positive control speaks for the
    configurations that train the same ones; `how` says how each positive control trained them. `faster`: the
    comparisons of configurations that train the bias at a multiple of the run's learning rate (with `slow`, the
    configuration that trains it at the run's): where a bias positive control does not move the metric, a faster bias
    that moved FASTER_ROOM times as far and still gained little shows it had room to act - its null is then a
    finding, not a blind spot. `parents`: each configuration's parent, against which a bias positive control that
    leaves val_ppl alone is read by position (`_acts_by_position`)."""
    parts = parts or {}
    parents = parents or {}
    how = how or {}
    with_parts = [c for c in configs if _metric_mean(rows, c, "val_ppl_without_position") is not None]
    if not with_parts:
        return []
    lines = ["## What the trained position components contribute (ablation)", "",
             "Each trained cell evaluated again with its position bias and landmarks removed (landmark scale and bias "
             "table set to 0, everything else as trained). The change is val_ppl with them vs without them, paired "
             "within each cell (negative = the components lower perplexity).", "",
             "| configuration | val_ppl | val_ppl without position components | change [95% CI] (p) |",
             "|---|---|---|---|"]
    changes = {}
    for c in with_parts:
        cells = [r for r in rows if r["config"] == c]
        with_ = {r["seed"]: r["metrics"]["val_ppl"] for r in cells}
        without = {r["seed"]: r["metrics"]["val_ppl_without_position"] for r in cells}
        change = changes[c] = stats.paired_relative_change(with_, without)
        lines.append(f"| {c} | {fmt(_mean(list(with_.values())))} | {fmt(_mean(list(without.values())))} | "
                     f"{change_cell(change)} |")
    # the fine-tuned configurations a conclusion may use: positive controls and diagnostics (INVALID) aside
    adapted = [c for c in with_parts if roles.get(c) != "positive control" and not c.endswith("(INVALID)")
               and changes[c]]
    alone = [(c, changes[c]) for c in with_parts if roles.get(c) == "positive control" and changes[c]]
    if adapted:
        widest = max(adapted, key=lambda c: abs(changes[c]["delta_pct"]))
        lines += ["", f"In the fine-tuned configurations{_aside(configs, roles)}, removing the "
                  f"trained position components changes val_ppl by at most {abs(changes[widest]['delta_pct']):.3f}% "
                  f"(mean over seeds, in `{widest}`)."
                  + ("" if alone else " No configuration of this run trains them alone (a positive control), so "
                     "the run does not show whether the metric could register more from them in this setting.")]
        for c, ch in alone:
            ci = ch["ci95"]
            moved = ci is not None and (ci[0] > 0 or ci[1] < 0)
            what = " and ".join({"bias": "the position bias"}.get(x, x) for x in sorted(parts.get(c, set()))) or (
                "position components")
            # the fine-tuned configurations that train the same components: what this control speaks for
            peers = [a for a in adapted if not parts.get(c) or parts.get(a, set()) & parts[c]]
            share = max((abs(changes[a]["delta_pct"]) for a in peers), default=None)
            text = (f" `{c}` ({what} {how.get(c, 'trained alone')}): the trained components change val_ppl by "
                    f"{change_cell(ch)}")
            if not moved:
                values = per_seed_values(rows)
                by_position, own = (_acts_by_position(rows, c, parents[c])
                                    if "bias" in parts.get(c, ()) and c in parents else ("", False))
                room = None  # a faster bias that moved FASTER_ROOM times as far as its slow twin, and what it gained
                for f in faster if "bias" in parts.get(c, ()) else ():
                    r = f.get("slow") and faster_room(values, f["slow"], {**BIAS_REACH, "faster": f["candidate"]},
                                                      f["parent"], "val_ppl", True)
                    if r:
                        room = f, r
                        break
                if room is not None:
                    f, r = room
                    text += (": over the whole window even alone they do not move val_ppl measurably"
                             + (f"; by position they do: {by_position}" if by_position and own else
                                f"; by position, {by_position}" if by_position else "")
                             + f". But at a larger learning rate (`{f['candidate']}`) "
                             + faster_reach_text(values, BIAS_REACH, f["candidate"], r["moved"], f["slow"], r["slow"])
                             + " and val_ppl "
                             f"gains at most {r['bound']:.2g}% (95% "
                             "CI): the bias had room to act and did not help val_ppl, so its null there is a finding "
                             "at this scale rather than a blind spot of the setting.")
                    fast_by_position, fast_own = _acts_by_position(rows, f["candidate"], f["parent"])
                    if fast_by_position:  # "acts" only where the changes are the components' own
                        text += (f" By position it acts{' too' if by_position and own else ''}: {fast_by_position}."
                                 if fast_own else f" By position, {fast_by_position}.")
                else:
                    text += (": over the whole window even alone they do not move val_ppl measurably, but by position "
                             f"they do: {by_position} - the setting sees them act, and a null for them on val_ppl is "
                             "what their changes add up to over the window, not a blind spot" if by_position and own
                             else ": even alone they do not move the metric measurably, so a null result for them here "
                             "may be a blind spot of this setting rather than a finding"
                             + (f" (by position, {by_position})" if by_position else ""))
                    reach = reach_clause(values, c, BIAS_REACH) if "bias" in parts.get(c, ()) else ""
                    text += f"; {reach}." if reach else "."
            elif ch["delta_pct"] > 0:  # a perplexity: trained alone, they made it worse
                text += (": the metric sees them, but for the worse (trained alone they raise val_ppl"
                         + (f", by less than {NEGLIGIBLE_PCT:g}%" if ch["delta_pct"] < NEGLIGIBLE_PCT else "")
                         + "), so nothing here shows that the component can help: a null or a loss for it in the "
                         "fine-tuned models is what it does at this scale, not a blind spot of the metric.")
            elif abs(ch["delta_pct"]) < NEGLIGIBLE_PCT:
                text += (f": measurable, but even alone they lower it by less than {NEGLIGIBLE_PCT:g}%, so at this "
                         "budget the component has little room either way: a null result for it here bounds its "
                         "effect at this scale rather than showing it has none.")
            elif share is not None and share < NEGLIGIBLE_PCT:
                text += (f": trained alone they move val_ppl by {abs(ch['delta_pct']):.2g}%, so the metric registers "
                         f"effects of that size from them; their near-zero share in the fine-tuned configurations that "
                         f"train {what} (at most {share:.3f}%, a mean over seeds) is what they contribute there, a "
                         "finding at this scale - what they learned in this budget - rather than a limit of the "
                         "metric.")
            else:
                text += ": they can move the metric."
            lines[-1] += text
    lines.append("")
    return lines


def _slow_twin(arms: dict[str, Arm], fast: str) -> str | None:
    """The arm that trains what `fast` trains, with the position bias at the arm's own learning rate (its note and
    role aside): what a faster bias is compared with."""
    plain = dataclasses.replace(arms[fast], bias_lr_scale=None)
    return next((name for name, arm in arms.items()
                 if dataclasses.replace(arm, note=plain.note, role=plain.role) == plain), None)


def _bias_reach_section(rows: list[dict], configs: list[str], faster: list[dict] = ()) -> list[str]:
    """How far each configuration's position bias trained, next to where a gradient of one sign would have taken it;
    `faster`: the comparisons of configurations that train the bias at a multiple of their learning rate (summary
    entries), each with `slow`, the configuration that trains it at the run's."""
    with_bias = [c for c in configs if _metric_mean(rows, c, BIAS_REACH["moved"]) is not None]
    if not with_bias:
        return []
    lines = ["## How far the position bias trained", "",
             "The position bias rescales each adapter's low-rank update at a token in bucket b by "
             "1 + sigmoid(w) tanh(bias[b]) (w: the adapter's gate), which is 1 at initialisation. `rescales the update "
             "by at most`: the largest distance of that factor from 1 over every adapter and bucket after training "
             "(mean over seeds / largest seed); `across positions`: the largest difference between two buckets' "
             "factors of one adapter (the part that depends on position; a rescaling the same at every position is "
             "one the LoRA update can learn itself). `one-sign reference`: where a gradient of one sign would have "
             "taken it - AdamW moves the gate and each table entry by about the learning rate per step, so by S, the "
             "sum of the run's learning rates, and the factor to 1 +- sigmoid(S) tanh(S) (a reference, not a "
             "ceiling: a growing gradient moves Adam further).", "",
             "| configuration | bias learning rate | rescales the update by at most (mean / largest seed) | "
             "across positions (largest seed) | one-sign reference |", "|---|---|---|---|---|"]
    typical = any(r["metrics"].get(BIAS_REACH["typical"]) is not None for r in rows)
    if typical:  # cells that recorded it: the distance at the average token of a window, over every adapter
        lines[2] += (" `at the average token`: that distance averaged over the positions of a training window and "
                     "every adapter (mean over seeds / largest seed) - what a metric averaged over tokens sees, where "
                     "the largest may come from a bucket that holds one early position.")
        lines[4] = lines[4].replace(" one-sign reference |", " at the average token (mean / largest seed) | "
                                    "one-sign reference |")
        lines[5] += "---|"
    largest, largest_token = {}, {}
    for c in with_bias:
        cells = [r for r in rows if r["config"] == c and r["metrics"].get(BIAS_REACH["moved"]) is not None]
        moved = [r["metrics"][BIAS_REACH["moved"]] for r in cells]
        spread = [r["metrics"]["bias_spread_pct"] for r in cells if r["metrics"].get("bias_spread_pct") is not None]
        allowed = max(r["metrics"][BIAS_REACH["allowed"]] for r in cells)
        rates = sorted({r["details"].get("position_bias", {}).get("lr") for r in cells} - {None})
        at_token = [r["metrics"][BIAS_REACH["typical"]] for r in cells
                    if r["metrics"].get(BIAS_REACH["typical"]) is not None]
        token_cell = (f" {sum(at_token) / len(at_token):.3g}% / {max(at_token):.3g}% |" if at_token else " - |") \
            if typical else ""
        largest[c] = max(moved)
        if at_token:
            largest_token[c] = max(at_token)
        lines.append(f"| {c} | {', '.join(f'{v:.3g}' for v in rates) or '-'} | {sum(moved) / len(moved):.3g}% / "
                     f"{max(moved):.3g}% | {f'{max(spread):.3g}%' if spread else '-'} |{token_cell} {allowed:.3g}% |")
    lines.append("")
    fast = [f for f in faster if f["candidate"] in largest and f["n"]]
    fast_names = {f["candidate"] for f in fast}
    at_run = [c for c in with_bias if c not in fast_names]
    said = ""
    if at_run:
        said = (f"At the run's learning rate the bias rescales the adapters' update by at most "
                f"{max(largest[c] for c in at_run):.3g}% in any configuration here.")
    if not fast:
        said += (" A null result for the bias holds for this learning rate only (`adapter.bias_lr` gives the bias a "
                 "learning rate of its own).")
    for f in fast:
        slow = largest.get(f.get("slow"))
        token, slow_token = largest_token.get(f["candidate"]), largest_token.get(f.get("slow"))
        said += (f" `{f['candidate']}` trains the bias at a larger learning rate: it rescales the update by up to "
                 f"{largest[f['candidate']]:.3g}% at its most rescaled position"
                 + (f", {largest[f['candidate']] / slow:.0f}x as far as `{f['slow']}`" if slow else "")
                 + (f", and by up to {token:.3g}% at the average token" if token is not None else "")
                 + (f", {token / slow_token:.0f}x as far" if token is not None and slow_token else "")
                 + f", and val_ppl changes by {effect_text(f)} vs `{f['parent']}`" + faster_reading(f) + ".")
    lines += [said.strip(), ""]
    return lines


def _mean_lists(lists: list[list]) -> list:
    out = []
    for values in zip(*lists, strict=True):
        vals = [v for v in values if v is not None]
        out.append(sum(vals) / len(vals) if vals else None)
    return out


def _by_config(rows: list[dict], configs: list[str], key: str) -> dict[str, list]:
    out = {}
    for c in configs:
        lists = [r["details"][key] for r in rows if r["config"] == c and r["details"].get(key)]
        if lists:
            out[c] = _mean_lists(lists)
    return out


def _decile_change(rows: list[dict], candidate: str, other: str, x: list):
    """`candidate`'s perplexity change vs `other` per position decile, paired by seed: a Curve over x of
    100 * (candidate / other - 1) (mean over the seeds both ran, min and max), or None where no seed has both."""
    theirs = {r["seed"]: r["details"]["decile_ppl"] for r in rows
              if r["config"] == other and r["details"].get("decile_ppl")}
    per_seed = [[None if v is None or b is None else 100 * (v / b - 1)
                 for v, b in zip(r["details"]["decile_ppl"], theirs[r["seed"]], strict=True)]
                for r in rows if r["config"] == candidate and r["details"].get("decile_ppl") and r["seed"] in theirs]
    return curve_over_seeds(x, per_seed) if per_seed else None


def _decile_plot(rows, configs, run: RunDir) -> bool:
    """Perplexity per position decile in two panels over the same x axis. Top: every configuration on a log axis, the
    mean over seeds shaded between the lowest and highest seed, one style per configuration of `configs` (the run's full
    list, as the report names them), its lowest labelled tick at or below the lowest value. Bottom: the configurations
    within `zoom_pct` (25%) of the reference (study.yaml's `reference`) at every decile, as their change vs the
    reference in % (per seed, then the mean over seeds, shaded min-max), so curves that the untrained model's scale
    crushes together in the top panel are told apart; beside it, a note names the ones left out and those still drawn
    on top of one another. One panel when there is no reference or nothing else to zoom on."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmlab.studies.report import band_note, plain_log_y, same_values_notes

    zoom_pct = 25.0  # the bottom panel's reach: beyond it a curve would flatten the others again
    x = [(d + 0.5) / 10 for d in range(10)]
    curves = detail_curves(rows, configs, "decile_ppl", x)
    if not curves:
        return False
    styles = config_styles(configs)
    reference = run.read_study().get("reference")
    reference = next((c for c in (reference, f"{reference} (INVALID)") if c in curves), None)

    def nan(values):
        return [float("nan") if v is None else v for v in values]

    # The change vs the reference, paired by seed: {config: Curve of 100 * (config / reference - 1) per decile}.
    changes = {}
    if reference is not None:
        for c in curves:
            change = _decile_change(rows, c, reference, x)
            if change is not None:
                changes[c] = change
    shown = {c: ch for c, ch in changes.items()
             if all(v is None or abs(v) <= zoom_pct for v in (ch.low or ch.y) + (ch.high or ch.y))}
    left_out = [c for c in curves if c not in shown]
    two = reference in shown and len(shown) > 1
    fig, axes = plt.subplots(2, 1, figsize=(7, 8), sharex=True) if two else plt.subplots(
        figsize=(7, 4.5))
    top = axes[0] if two else axes

    def draw(ax, series):
        band_alpha = min(0.2, 1.2 / len(series))  # lighter bands where many overlap
        for label, curve in series.items():
            ax.plot(curve.x, nan(curve.y), label=label + notes.get(label, ""), fillstyle="none", markersize=6,
                    **styles[label])
            if curve.low is not None and curve.seeds > 1 and label not in notes:  # a twin's band is the same
                ax.fill_between(curve.x, nan(curve.low), nan(curve.high), color=styles[label]["color"],
                                alpha=band_alpha, linewidth=0)
        ax.axvspan(0.25, 0.75, color="grey", alpha=0.1, label="LIM region")

    notes = same_values_notes({label: (c.x, c.y) for label, c in curves.items()})
    seeds = max((c.seeds for c in curves.values() if c.low is not None), default=1)
    draw(top, curves)
    # Log axis with a labelled tick at or below the lowest value, so no curve lies below every labelled tick: the
    # bottom edge snapped down to a round number (1, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8 x 10^k), labelled.
    top.set_yscale("log")
    lowest = min(v for c in curves.values() for v in (c.low or c.y) if v is not None and v > 0)
    power = 10 ** math.floor(math.log10(lowest * 0.98))
    edge = max(m * power for m in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8) if m * power <= lowest * 0.98)
    high = top.get_ylim()[1]
    top.set_ylim(edge, high)
    plain_log_y(top)
    ticks = [t for t in top.get_yticks() if edge <= t <= high]
    if not ticks or ticks[0] > lowest:
        top.set_yticks(sorted({edge, *ticks}))
        top.set_ylim(edge, high)
    label_axes(top, xlabel="" if two else "relative position in the window", ylabel="perplexity (mean over seeds)",
               title="Perplexity by position decile (log scale)", legend_title=band_note(seeds) if seeds > 1 else None)
    if two:
        bottom = axes[1]
        notes = {}  # the top panel's legend already says which series are identical
        draw(bottom, shown)
        label_axes(bottom, xlabel="relative position in the window",
                   ylabel=f"change vs {reference} in % (per seed, mean over seeds; shaded: min-max over seeds)",
                   title=f"Zoom: change vs the reference {reference} in %, paired by seed", legend=False)
        # Curves closer than about a line's width at every decile (1/60 of the panel's height) are drawn on top of
        # one another: the panel names them, so a reader knows they are not missing but the same to this resolution.
        low, high = bottom.get_ylim()
        close = (high - low) / 60
        groups: list[list[str]] = []
        for c in (c for c in shown if c != reference):
            group = next((g for g in groups if all(
                a is None or b is None or abs(a - b) <= close
                for a, b in zip(shown[g[0]].y, shown[c].y, strict=True))), None)
            if group is None:
                groups.append([c])
            else:
                group.append(c)
        said = [f"Drawn on top of one another: {', '.join(g)} (each mean within {close:.2g} percentage points of "
                f"{g[0]}'s at every decile)." for g in groups if len(g) > 1]
        if said:
            said.append(f"The reference {reference} is the line at 0.")
        if left_out:
            said.append(f"Not in this panel (beyond ±{zoom_pct:g}% of {reference} at some decile; see the top "
                        f"panel): {', '.join(left_out)}.")
        if said:  # in the free space right of the panel, under the legend
            bottom.text(1.02, 0.0, "\n\n".join(textwrap.fill(t, 38) for t in said), transform=bottom.transAxes,
                        fontsize=8, va="bottom", ha="left")
        fig.subplots_adjust(hspace=0.3)
    save_figure(fig, run, "perplexity_by_decile.png")
    return True


def _component_decile_plot(rows, configs, comparisons: list[dict], run: RunDir) -> list[tuple[str, str, str]]:
    """Where along the window each declared comparison's component acts: one small panel per comparison whose
    candidate and parent both have per-decile perplexity, showing the candidate's change vs its parent in % per
    position decile, paired by seed (the mean over seeds, shaded between the lowest and highest seed), each panel on
    its own y axis with the zero line marked - so a component worth 0.05% is read on its own scale rather than flattened
    by one worth 30%, and changes of opposite sign at the window's two ends, which cancel in val_ppl, show; a panel
    whose values all lie within the metric's resolution (RESOLUTION_PCT: float rounding) is drawn at that scale and says
    so. The title's seed count is the most any panel pairs. Saved as
    plots/component_by_decile.png; returns the comparisons drawn as (component, candidate, parent), in order."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    x = [(d + 0.5) / 10 for d in range(10)]
    panels = []
    for comp in comparisons:
        cand, parent = comp["candidate"], comp["parent"]
        change = _decile_change(rows, cand, parent, x)
        if change is not None and any(v is not None for v in change.y):
            panels.append((comp["component"], cand, parent, change))
    if not panels:
        return []
    styles = config_styles(configs)
    columns = min(3, len(panels))
    rows_n = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows_n, columns, figsize=(3.6 * columns, 2.6 * rows_n + 0.6), sharex=True, squeeze=False,
                             layout="constrained")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for i, (ax, (component, cand, parent, curve)) in enumerate(zip(axes.flat, panels, strict=False)):
        style = styles.get(cand, {"color": "C0", "marker": "o", "linestyle": "-"})
        ax.axvspan(0.25, 0.75, color="grey", alpha=0.1)
        ax.axhline(0.0, color="grey", linewidth=0.8)
        y = [float("nan") if v is None else v for v in curve.y]
        ax.plot(curve.x, y, fillstyle="none", markersize=5, **style)
        if curve.seeds > 1:
            ax.fill_between(curve.x, [float("nan") if v is None else v for v in curve.low],
                            [float("nan") if v is None else v for v in curve.high], color=style["color"], alpha=0.2,
                            linewidth=0)
        reach = max((abs(v) for v in (curve.low or []) + (curve.high or []) + curve.y if v is not None), default=0.0)
        if reach < RESOLUTION_PCT:  # float rounding only: drawn at the metric's resolution, not blown up
            ax.set_ylim(-2 * RESOLUTION_PCT, 2 * RESOLUTION_PCT)
            for edge in (-RESOLUTION_PCT, RESOLUTION_PCT):
                ax.axhline(edge, color="grey", linewidth=0.8, linestyle=":")
            ax.text(0.5, 0.95, f"within ±{RESOLUTION_PCT:g}% (float rounding) at every decile", fontsize=7,
                    ha="center", va="top", transform=ax.transAxes)
        ax.set_title(textwrap.fill(f"{component}: {cand} vs {parent}", 38), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if i % columns == 0:
            ax.set_ylabel("change in %", fontsize=8)
        if i + columns >= len(panels):
            ax.set_xlabel("relative position in the window", fontsize=8)
            ax.xaxis.set_tick_params(labelbottom=True)
    seeds = max(c.seeds for *_, c in panels)
    fig.suptitle(textwrap.fill(
        "Perplexity change of each comparison's candidate vs its parent, by position decile, paired by seed (below 0: "
        "lower perplexity). Each panel has its own y axis; grey band: the LIM region"
        + (f"; line: mean over seeds, shaded: min-max over the seeds both ran (up to {seeds})." if seeds > 1
           else "; one seed."),
        110), fontsize=9)
    save_figure(fig, run, "component_by_decile.png")
    return [(component, cand, parent) for component, cand, parent, _ in panels]


def _retrieval_table(rows, configs) -> list[str]:
    curves = _by_config(rows, configs, "retrieval_by_depth")
    if not curves:
        return []
    lines = ["| configuration | " + " | ".join(f"{d * 10}-{d * 10 + 10}%" for d in range(10)) + " |",
             "|" + "---|" * 11]
    native = _by_config(rows, ["base"], "retrieval_by_depth_native")
    # the base as pretrained is a row of its own only where the run extends its context (else it is `base` again)
    native = {c: v for c, v in native.items() if v != curves.get(c)}
    for c, values in [*(("base (as pretrained, no extension)", v) for v in native.values()), *curves.items()]:
        lines.append(f"| {c} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in values) + " |")
    # every configuration answers the same queries: their count per decile (over the seeds) says how far a mean can be
    # trusted (a decile with a handful of queries swings by whole tenths)
    counts, first = {}, next(iter(curves))
    for r in rows:
        if r["config"] == first and r["details"].get("retrieval_counts"):
            counts[r["seed"]] = r["details"]["retrieval_counts"]
    if counts:
        total = [sum(col) for col in zip(*counts.values(), strict=True)]
        lines.append(f"| queries ({len(counts)} seeds) | " + " | ".join(f"{n:,}" for n in total) + " |")
    return lines


MIN_DECILE_QUERIES = 30  # a depth decile with fewer queries over the seeds is left out of the retrieval plot


def _retrieval_plot(rows, configs, run: RunDir, values: int | None = None) -> list[str]:
    """Retrieval accuracy per depth decile of the planted fact on a [0, 1] axis: the mean over seeds, shaded between
    the lowest and highest seed, one style per configuration of `configs` (the run's full list). Deciles with fewer
    than MIN_DECILE_QUERIES queries over the seeds (every configuration answers the same ones) are gaps; returns
    their names. With `values` (how many equally likely values a planted fact takes) a dashed line marks guessing."""
    x = [(d + 0.5) / 10 for d in range(10)]
    curves = detail_curves(rows, configs, "retrieval_by_depth", x)
    totals: dict[int, list[int]] = {}
    for r in rows:
        if r["details"].get("retrieval_counts") and r["config"] == next(iter(curves), None):
            totals[r["seed"]] = r["details"]["retrieval_counts"]
    sparse = [d for d, n in enumerate(map(sum, zip(*totals.values(), strict=True))) if n < MIN_DECILE_QUERIES] \
        if totals else []
    if sparse:
        def gaps(values):
            return None if values is None else [None if i in sparse else v for i, v in enumerate(values)]

        curves = {c: curve._replace(y=gaps(curve.y), low=gaps(curve.low), high=gaps(curve.high))
                  for c, curve in curves.items()}
    line_plot(run, "retrieval_by_depth.png", curves, styles=config_styles(configs),
              xlabel="depth of the planted fact in the document", ylabel="retrieval accuracy (mean over seeds)",
              title="Retrieval accuracy by depth", unit_y=True,
              hline=(1 / values, f"guessing (1 in {values:,})") if values else None)
    return [f"{d * 10}-{d * 10 + 10}%" for d in sparse]


def random_move_reference(drift_random: float, count: int) -> dict:
    """How far `count` boundaries move under gradients of random sign, in tokens, each a random walk of standard
    deviation `drift_random` (step_size_scale): `mean` the expected absolute move of one boundary,
    sigma sqrt(2/pi), and `max` the 95% quantile of the largest of `count` absolute moves,
    sigma Phi^-1((1 + 0.95^(1/count)) / 2)."""
    from scipy.stats import norm

    return {"mean": drift_random * math.sqrt(2 / math.pi),
            "max": drift_random * float(norm.ppf((1 + 0.95 ** (1 / max(1, count))) / 2))}


def boundary_sentence(config: str, cells: list[dict]) -> str:
    """What the learned boundaries of a configuration's cells show, against gradients of random sign: the largest move
    against the 95% quantile of the largest of as many random walks, the mean move against a random walk's mean, how
    many buckets are distinguishable after training and before it (the assignment's own resolution), and, under a
    hard assignment, a boundary that fell below position 0 (its bucket holds no position)."""
    moves = [[abs(a - c) for a, c in zip(b["initial"], b["learned"], strict=True)] for b in cells]
    largest, mean = max(max(m) for m in moves), max(sum(m) / len(m) for m in moves)
    count = len(cells[0]["initial"])
    ref = random_move_reference(max(b["drift_random"] for b in cells), count)
    said = (f"`{config}`: boundaries moved up to {largest:.1f} tokens, {mean:.2f} on average (each the largest over "
            f"seeds); gradients of random sign would move the farthest of {count} boundaries up to "
            f"{ref['max']:.1f} (95%) and one by {ref['mean']:.2f} on average: ")
    said += ("the largest moves exceed that, so the gradient kept a direction for some boundaries"
             if largest > ref["max"] else "no more than noise alone would move them")
    effective = sorted(b["effective_buckets"] for b in cells)
    span = f"{effective[0]}-{effective[-1]}" if effective[0] != effective[-1] else f"{effective[0]}"
    said += f"; {span} of {cells[0]['num_buckets']} buckets distinguishable after training"
    initial = initial_effective_buckets(cells[0])
    if initial is not None:
        said += (f" (at initialisation: {initial} under the {cells[0]['assignment']} assignment"
                 + (", so training lost no resolution" if effective[0] >= initial else "") + ")")
    lowest = min(min(b["learned"]) for b in cells)
    # only a hard assignment empties a bucket whose boundary fell below position 0; a soft one still gives it weight
    if lowest < 0 and cells[0].get("assignment") == "straight_through":
        said += (f"; a boundary fell to {lowest:.1f}, below position 0, so the bucket before it holds no position")
    return said + "."


def initial_effective_buckets(boundaries: dict) -> int | None:
    """How many buckets a learnable-bucket cell's assignment told apart before training (`effective_buckets` of its
    initial boundaries): all of them for a hard or relative assignment, 8 of 32 for the notes' absolute one over 512
    positions. Recorded at training time beside the trained count (`learned_boundaries`); rebuilt from the initial
    edges for an older record; None for a record without the assignment's settings."""
    from lmlab.hylorada.position import LearnableBuckets

    if "initial_effective_buckets" in boundaries:
        return boundaries["initial_effective_buckets"]
    if not {"initial", "max_positions", "temperature", "assignment"} <= set(boundaries):
        return None
    return LearnableBuckets(boundaries["initial"], boundaries["max_positions"], boundaries["temperature"],
                            boundaries["assignment"]).effective_buckets()


def _boundary_section(rows, run: RunDir) -> list[str]:
    with_b = [r for r in rows if r["details"].get("boundaries")]
    if not with_b:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["## Learned bucket boundaries (token positions)", "",
             "Each learnable-bucket cell's boundaries after training next to their initial (fixed-scheme) positions. "
             "`moved` is the largest and mean absolute change in tokens; `step size alone` is how far AdamW's step "
             "size could move a boundary over the run - in a consistent direction (sum of the learning rates) and "
             "under gradients of random sign (their root sum of squares: the standard deviation of one boundary's "
             "random walk, whose mean absolute move is 0.80 times that - the reference the sentences below use for "
             "the mean move), in tokens. `effective buckets` counts the "
             "buckets that hold the largest weight at some position (the fixed scheme: all of them; a soft assignment "
             "can tell fewer apart already at initialisation, which the sentences below give).", "",
             "| configuration | seed | assignment | effective buckets | moved (max / mean) | step size alone "
             "(consistent / random) | learned |", "|---|---|---|---|---|---|---|"]
    from matplotlib.ticker import MaxNLocator

    # Colour: the configuration's in every plot of the run (report_sections marks a diagnostic's name " (INVALID)");
    # marker and line style: the seed.
    record = run.read_study()
    styles = config_styles(record["configurations"])
    seeds = {seed: i for i, seed in enumerate(record["seeds"])}
    # The boundaries span 1..max_length on a log scheme, but move by a few tokens: the figure shows each one's move.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in with_b:
        b = r["details"]["boundaries"]
        initial, learned = b["initial"], b["learned"]
        moves = [abs(a - c) for a, c in zip(initial, learned, strict=True)] or [0.0]
        effective = f"{b['effective_buckets']} of {b['num_buckets']}" if "effective_buckets" in b else "-"
        drift = (f"{b['drift_consistent']:.1f} / {b['drift_random']:.1f}" if "drift_consistent" in b else "-")
        lines.append(f"| {r['config']} | {r['seed']} | {b.get('assignment', '-')} | {effective} | "
                     f"{max(moves):.2f} / {sum(moves) / len(moves):.2f} | {drift} | "
                     f"{', '.join(f'{v:.1f}' for v in learned)} |")
        seed = seeds.get(r["seed"], len(seeds))
        ax.plot(range(len(learned)), [c - a for a, c in zip(initial, learned, strict=True)],
                color=styles[r["config"].removesuffix(" (INVALID)")]["color"], marker=MARKERS[seed % len(MARKERS)],
                linestyle=LINE_STYLES[seed % len(LINE_STYLES)], fillstyle="none",
                label=f"{r['config']} seed {r['seed']}")
    initial = with_b[0]["details"]["boundaries"]["initial"]
    lines += ["", f"Initial boundaries (the fixed scheme): {', '.join(str(v) for v in initial)}."]
    band = one = None
    for config in dict.fromkeys(r["config"] for r in with_b):
        cells = [r["details"]["boundaries"] for r in with_b if r["config"] == config]
        if "drift_random" in cells[0]:
            lines.append(boundary_sentence(config, cells))
            band = max(band or 0.0, max(random_move_reference(b["drift_random"], len(b["initial"]))["max"]
                                        for b in cells))
            one = max(one or 0.0, max(1.96 * b["drift_random"] for b in cells))
    ax.axhline(0.0, color="black", linewidth=0.8)
    if band:
        count = len(with_b[0]["details"]["boundaries"]["initial"])
        ax.axhspan(-band, band, color="grey", alpha=0.12,
                   label=f"gradients of random sign: the farthest of {count} boundaries, 95%")
        ax.axhspan(-one, one, color="grey", alpha=0.25, label="gradients of random sign: any one boundary, 95%")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    label_axes(ax, xlabel="boundary index (initial positions: the fixed log scheme)",
               ylabel="learned - initial position (tokens)", title="Bucket boundaries: how far each one moved")
    save_figure(fig, run, "bucket_boundaries.png")
    lines.append("")
    return lines


HYLORADA = HyloradaStudy("hylorada", HYLORADA_ARMS, "lora", "rslora+bias+landmarks", HYLORADA_COMPARISONS,
                         HYLORADA_CLAIMS)
LANDMARKS = HyloradaStudy("landmarks", LANDMARK_ARMS, "rslora", "position_adaptive", LANDMARK_COMPARISONS,
                          LANDMARK_CLAIMS)
BUCKETING = HyloradaStudy("bucketing", BUCKETING_ARMS, "fixed", "learnable", BUCKETING_COMPARISONS, BUCKETING_CLAIMS)
