"""The LatentWire study (docs/latentwire.md section 5): `lmlab run latentwire`, ablations chosen by `ablation=`.

One recipe per cell: the frozen source and target (tiny bases pretrained on the built-in arithmetic
problems and cached, or Hugging Face models) are loaded once per run; each cell builds a translator of its
arm's size, trains it with the one training loop on the bridge loss, evaluating the bridged accuracy on
held-out training items every `eval_every` steps (`validation/eval_samples_step<N>.jsonl`), and then
evaluates the six systems on the same test items, writing the cell's `eval_samples.jsonl`.

Arms (configurations):
- `stable_k<K>`: the stability fixes (InfoNCE + early stopping with the best weights restored);
- `baseline_k<K>`: no InfoNCE, no early stopping, the last weights (evaluated along the way for the curve);
- a `_soft_plus_text` suffix for the other conditioning mode, `_swapped` for source and target exchanged.
A seed fixes the translator's initialisation, the training sample and its order; the evaluation items are
the same for every cell, so the text-only systems (`target_text`, `source_text`, `token_budget`), which
do not involve the translator, are generated once per direction (and K) and shared by the cells.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from statistics import fmean
from typing import Literal

import numpy as np
import torch
from pydantic import Field, PositiveInt, field_validator, model_validator

from lmlab import stats
from lmlab.data import generators
from lmlab.data.sources import load_qa_items
from lmlab.engine import distributed as D
from lmlab.engine.hooks import Display, Hooks
from lmlab.engine.train import LossOut, TrainConfig, TrainResult, total_steps, train
from lmlab.errors import ConfigError, DataError
from lmlab.latentwire.bridge import LatentWireBridge, Mode, PromptEncoder, build_translator
from lmlab.latentwire.evaluate import (
    SAMPLES_FILE,
    SHARED_SYSTEMS,
    SYSTEMS,
    LatentWireEval,
    evaluate_latentwire,
    write_eval_samples,
)
from lmlab.latentwire.gsm8k import GSM8KPrompt, select_exemplars
from lmlab.latentwire.losses import LossWeights, answer_nll, bridge_loss
from lmlab.latentwire.translator import PAPER_PRESETS, TranslatorShape, optimizer_rules, parameter_count
from lmlab.models.hf import learned_positions, load_causal_lm, load_tokenizer
from lmlab.models.tiny import TinyModelConfig
from lmlab.studies.attribution import interval_verdict, judge_claim, per_seed_values
from lmlab.studies.pretrain import PretrainConfig, pretrained_tiny
from lmlab.studies.report import (
    LINE_STYLES,
    cell_curves,
    config_styles,
    fmt,
    label_axes,
    line_plot,
    mean_over_seeds,
    plain_number,
    same_values_notes,
    save_figure,
    second_half_start,
    seed_curves,
)
from lmlab.studies.rundir import TRAIN_STATE, RunDir
from lmlab.studies.runner import CellOutput, Study, StudyConfig
from lmlab.studies.setting import describe_data, describe_model, plural

BRIDGE_SYSTEMS = ("bridged", "zero_prefix", "shuffled_source")  # the systems that go through the translator
TEXT_SYSTEMS = SHARED_SYSTEMS  # translator-free: generated once per direction (and K), shared by the cells
PRIMARY = "bridged/acc_flexible"


class LatentWireStudyConfig(StudyConfig):
    """A LatentWire study: the two models, data, the arms' K and translator sizes, losses and training."""

    ALIASES = {
        "lr": "train.lr", "learning_rate": "train.lr", "epochs": "train.epochs", "batch_size": "train.batch_size",
        "grad_accum": "train.grad_accum", "max_steps": "train.max_steps", "eval_every": "train.eval_every",
        "early_stopping_patience": "train.early_stopping_patience", "patience": "train.early_stopping_patience",
        "K": "num_queries", "samples": "num_eval",
    }

    ablation: list[Literal["stability", "compression", "mode", "swap"]] = Field(
        default_factory=lambda: ["compression", "stability"], min_length=1,
        description="studies to run (a list, or names joined by commas)")
    source_model: str = Field("builtin", description="'builtin' (a cached tiny base) or an HF model dir / hub id")
    target_model: str = Field("builtin", description="'builtin' (a cached tiny base) or an HF model dir / hub id")
    source: PretrainConfig = PretrainConfig(
        name="latentwire-source", model=TinyModelConfig(arch="gpt2"), data="arithmetic", vocab_size=512,
        tokenizer_seed=1)
    target: PretrainConfig = PretrainConfig(
        name="latentwire-target", model=TinyModelConfig(arch="llama", num_kv_heads=2), data="arithmetic",
        vocab_size=384, tokenizer_seed=2)
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights of the frozen models")
    trust_remote_code: bool = False
    dataset: str = Field("builtin", description="'builtin' arithmetic problems, gsm8k, or local GSM8K-format JSONL")
    num_train: int = Field(4000, ge=1, description="translator training items (at most)")
    num_val: int = Field(128, ge=2, description="held-out training items evaluated during training")
    num_eval: int = Field(200, ge=2, description="test items every system is evaluated on")
    n_shot: int = Field(0, ge=0, description="few-shot exemplars in the text prompt (seed 42, training split)")
    mode: Mode = "soft_only"
    num_queries: int = Field(16, ge=1, description="K of the stability, mode and swap arms")
    compression_k: list[PositiveInt] = Field(default_factory=lambda: [8, 12, 16], min_length=1)
    translators: list[TranslatorShape] = Field(
        default_factory=list, description="translator size per K; a K without one uses the notes' preset")
    source_layer: int = Field(-1, description="hidden-state layer of the source the translator reads")
    kl_weight: float = Field(0.0, ge=0.0)
    info_nce_weight: float = Field(0.05, ge=0.0)
    info_nce_start_fraction: float = Field(0.5, ge=0.0, description="InfoNCE starts after this fraction of warmup")
    temperature: float = Field(0.07, gt=0.0)
    prompt_align_weight: float = Field(0.0, ge=0.0)
    train: TrainConfig = TrainConfig(epochs=1, batch_size=16, lr=3e-3, warmup_ratio=0.05, eval_every=100,
                                     early_stopping_patience=5)
    eval_batch_size: int = Field(64, ge=1)
    max_new_tokens: int = Field(128, ge=1)

    @field_validator("ablation", mode="before")
    @classmethod
    def _split_names(cls, value):
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return list(dict.fromkeys(value)) if isinstance(value, list) else value

    @model_validator(mode="after")
    def _sizes_for_every_k(self):
        sizes = [t.num_queries for t in self.translators]
        if len(sizes) != len(set(sizes)):
            raise ValueError(f"translators: more than one size for K in {sizes}")
        for k in sorted({arm.num_queries for arm in study_arms(self).values()}):
            if k not in sizes and k not in PAPER_PRESETS:
                raise ValueError(f"no translator size for K={k}: add it to translators "
                                 f"(num_queries, bottleneck, depth, heads) or use a preset K {sorted(PAPER_PRESETS)}")
        return self


# ---------------------------------------------------------------------------------------------------
# Arms


@dataclass(frozen=True)
class Arm:
    """One configuration: K soft tokens, with or without the stability fixes, a mode and a direction."""

    num_queries: int
    fixes: bool = True
    mode: str = "soft_only"
    swapped: bool = False

    @property
    def name(self) -> str:
        name = f"{'stable' if self.fixes else 'baseline'}_k{self.num_queries}"
        if self.mode != "soft_only":
            name += f"_{self.mode}"
        return name + ("_swapped" if self.swapped else "")


def study_arms(cfg: LatentWireStudyConfig) -> dict[str, Arm]:
    """Every arm the chosen ablations need, by name, in order; an arm shared by two ablations runs once."""
    k = cfg.num_queries
    arms: list[Arm] = []
    for ablation in cfg.ablation:
        if ablation == "compression":
            arms += [Arm(q, True, cfg.mode) for q in sorted(set(cfg.compression_k))]
        elif ablation == "stability":
            arms += [Arm(k, True, cfg.mode), Arm(k, False, cfg.mode)]
        elif ablation == "mode":
            arms += [Arm(k, True, "soft_only"), Arm(k, True, "soft_plus_text")]
        else:
            arms += [Arm(k, True, cfg.mode), Arm(k, True, cfg.mode, swapped=True)]
    return {arm.name: arm for arm in arms}


def reference_and_candidate(cfg: LatentWireStudyConfig) -> tuple[str, str]:
    """The decision's pair, from the first of stability, compression, mode, swap that runs."""
    k = cfg.num_queries
    if "stability" in cfg.ablation:
        return Arm(k, False, cfg.mode).name, Arm(k, True, cfg.mode).name
    if "compression" in cfg.ablation:  # does the strongest compression lose accuracy against the weakest?
        return Arm(max(cfg.compression_k), True, cfg.mode).name, Arm(min(cfg.compression_k), True, cfg.mode).name
    if "mode" in cfg.ablation:
        return Arm(k, True, "soft_plus_text").name, Arm(k, True, "soft_only").name
    return Arm(k, True, cfg.mode).name, Arm(k, True, cfg.mode, swapped=True).name


def latentwire_comparisons(cfg: LatentWireStudyConfig) -> list[dict]:
    """One factor per comparison, so an effect has one cause: the stability fixes at K; each smaller K against the
    largest (fixes on in both); soft tokens only against soft tokens plus text; the swapped direction against the
    forward one. The decision's pair is the headline."""
    k, mode = cfg.num_queries, cfg.mode
    specs: list[dict] = []
    for ablation in cfg.ablation:
        if ablation == "stability":
            specs.append({"component": f"stability fixes at K = {k} (InfoNCE, best weights restored, early stopping)",
                          "candidate": Arm(k, True, mode).name, "parent": Arm(k, False, mode).name})
        elif ablation == "compression":
            ks = sorted(set(cfg.compression_k))
            specs += [{"component": f"K = {q} soft tokens instead of {ks[-1]}", "candidate": Arm(q, True, mode).name,
                       "parent": Arm(ks[-1], True, mode).name} for q in ks[:-1]]
        elif ablation == "mode":
            specs.append({"component": "soft tokens only (no text)", "candidate": Arm(k, True, "soft_only").name,
                          "parent": Arm(k, True, "soft_plus_text").name})
        else:
            specs.append({"component": "the swapped direction", "candidate": Arm(k, True, mode, swapped=True).name,
                          "parent": Arm(k, True, mode).name})
    reference, candidate = reference_and_candidate(cfg)
    unique = {(spec["candidate"], spec["parent"]): spec for spec in specs}
    return [{**spec, "headline": pair == (candidate, reference)} for pair, spec in unique.items()]


def translator_shape(cfg: LatentWireStudyConfig, num_queries: int) -> TranslatorShape:
    for shape in cfg.translators:
        if shape.num_queries == num_queries:
            return shape
    return PAPER_PRESETS[num_queries]


def loss_weights(cfg: LatentWireStudyConfig, num_train: int) -> LossWeights:
    """The loss weights, with InfoNCE starting after `info_nce_start_fraction` of the warmup steps."""
    steps = total_steps(num_train, cfg.train)
    warmup = cfg.train.warmup_steps if cfg.train.warmup_steps is not None else round(cfg.train.warmup_ratio * steps)
    return LossWeights(kl_weight=cfg.kl_weight, info_nce_weight=cfg.info_nce_weight,
                       info_nce_start=round(cfg.info_nce_start_fraction * warmup), temperature=cfg.temperature,
                       prompt_align_weight=cfg.prompt_align_weight)


# ---------------------------------------------------------------------------------------------------
# Training


def collate_items(encoder: PromptEncoder, items: Sequence[dict]) -> dict:
    """A training batch, with the tokens the models read (source prompt + student input) for tokens/s."""
    batch = encoder(items)
    batch["num_tokens"] = int(batch["source_mask"].sum() + batch["student_mask"].sum())
    return batch


@torch.no_grad()
def validation_run(bridge: LatentWireBridge, items: Sequence[dict], *, batch_size: int = 64,
                   max_new_tokens: int = 128) -> LatentWireEval:
    """The bridged system on held-out items, its metrics completed with `val_acc` (its flexible accuracy)
    and `val_nll` (teacher-forced answer NLL per token)."""
    result = evaluate_latentwire(bridge, items, systems=("bridged",), batch_size=batch_size,
                                 max_new_tokens=max_new_tokens)
    nll, tokens = 0.0, 0
    device = bridge.translator.queries.device
    for lo in range(0, len(items), batch_size):
        batch = {k: v.to(device) for k, v in bridge.encoder(items[lo: lo + batch_size]).items()}
        out = bridge(batch)
        batch_nll, batch_tokens = answer_nll(out.logits, out.labels)
        nll, tokens = nll + float(batch_nll), tokens + int(batch_tokens)
    result.metrics.update(val_acc=result.metrics["bridged/acc_flexible"], val_nll=nll / max(tokens, 1))
    return result


class TranslatorHooks(Hooks):
    """LatentWire's part of the training loop: the bridge loss (InfoNCE from step `info_nce_start`), the
    translator's optimizer groups, and every `eval_every` steps `evaluate(bridge)` (by default `validation_run` on
    the validation items, whose samples go to `samples_dir/eval_samples_step<N>.jsonl`) picking the best `val_acc`."""

    select, higher_is_better = "val_acc", True

    def __init__(self, bridge: LatentWireBridge, weights: LossWeights, val_items: Sequence[dict], *,
                 restore_best: bool, evaluate: Callable[[LatentWireBridge], dict] | None = None,
                 val_batch_size: int = 64, val_max_new_tokens: int = 128, samples_dir: str | Path | None = None):
        self.bridge, self.weights, self.val_items = bridge, weights, val_items
        self.restore_best, self.custom_evaluate = restore_best, evaluate
        self.val_batch_size, self.val_max_new_tokens, self.samples_dir = val_batch_size, val_max_new_tokens, samples_dir

    def param_rules(self):
        return optimizer_rules()

    def collate(self, examples: list):
        return collate_items(self.bridge.encoder, examples)

    def loss(self, state, model, batch) -> LossOut:
        total, tokens, logs = bridge_loss(model, batch, state.step, self.weights)
        return LossOut(total, tokens, logs)

    def evaluate(self, state) -> dict:
        if self.custom_evaluate is not None:
            return self.custom_evaluate(state.model)
        result = validation_run(state.model, self.val_items, batch_size=self.val_batch_size,
                                max_new_tokens=self.val_max_new_tokens)
        if self.samples_dir is not None and D.is_main():
            write_eval_samples(Path(self.samples_dir) / f"eval_samples_step{state.step}.jsonl", result.samples)
        return {"val_acc": result.metrics["val_acc"], "val_nll": result.metrics["val_nll"]}


def train_translator(bridge: LatentWireBridge, train_items: Sequence[dict], val_items: Sequence[dict],
                     cfg: TrainConfig, weights: LossWeights, *, seed: int, stability_fixes: bool,
                     evaluate: Callable[[LatentWireBridge], dict] | None = None, val_batch_size: int = 64,
                     val_max_new_tokens: int = 128, metrics_path: str | Path | None = None,
                     samples_dir: str | Path | None = None, checkpoint_dir: str | Path | None = None,
                     display: Display | None = None) -> TrainResult:
    """Train the bridge's translator (its only trainable part) with the one training loop (`TranslatorHooks`).

    With the stability fixes, InfoNCE is on, training stops after `cfg.early_stopping_patience` evaluations without
    a better `val_acc`, and the best evaluation's weights (a copy) are restored. Without them: no InfoNCE, no early
    stopping, the last weights are kept.
    """
    if not stability_fixes:
        weights = weights.model_copy(update={"info_nce_weight": 0.0})
        cfg = cfg.model_copy(update={"early_stopping_patience": None})
    hooks = TranslatorHooks(bridge, weights, val_items, restore_best=stability_fixes, evaluate=evaluate,
                            val_batch_size=val_batch_size, val_max_new_tokens=val_max_new_tokens,
                            samples_dir=samples_dir)
    return train(bridge, train_items, cfg, seed=seed, hooks=hooks, checkpoint_dir=checkpoint_dir,
                 metrics_path=metrics_path, display=display or Display(progress=False, desc="translator"))


# ---------------------------------------------------------------------------------------------------
# Evaluation


def merge_evaluations(parts: Sequence[LatentWireEval]) -> LatentWireEval:
    """One evaluation from several over the same items (each with some of the systems), systems in SYSTEMS order."""
    metrics = {k: v for part in parts for k, v in part.metrics.items()}
    samples = []
    for per_item in zip(*(part.samples for part in parts), strict=True):
        systems = {name: record for sample in per_item for name, record in sample["systems"].items()}
        samples.append({**per_item[0], "systems": {s: systems[s] for s in SYSTEMS if s in systems}})
    notes = {k: v for part in parts for k, v in part.notes.items()}
    return LatentWireEval(metrics=metrics, samples=samples, notes=notes)


@dataclass
class _Side:
    """A frozen model with its tokenizer."""

    path: str
    model: torch.nn.Module
    tokenizer: object


@dataclass
class _Context:
    cfg: LatentWireStudyConfig
    source: _Side
    target: _Side
    prompt: GSM8KPrompt
    eval_items: list[dict]
    setup: dict
    train_split: list[dict] | None = None  # a data set's training split (builtin items are generated per seed)
    text_evals: dict = field(default_factory=dict)  # (swapped, system, K) -> LatentWireEval of a text-only system


def _check_positions(side: _Side, prompt: GSM8KPrompt, items: Sequence[dict], reserve: int) -> None:
    """A model with a table of learned positions (GPT-2's n_positions) cannot read past it: say so up front.

    `reserve`: positions besides BOS and the text prompt (new tokens, and soft tokens in soft_plus_text).
    """
    positions = learned_positions(side.model.config)
    if positions is None:
        return
    longest = max(len(side.tokenizer(prompt.text(item))["input_ids"]) for item in items) + 1 + reserve
    if longest > positions:
        raise ConfigError(f"{side.path}: the longest text prompt with its generated (and soft) tokens needs {longest} "
                          f"positions, more than the model's {positions} learned positions (n_positions); "
                          "lower n_shot or max_new_tokens")


class LatentWireStudy(Study):
    name = "latentwire"
    config_cls = LatentWireStudyConfig
    primary_metric = PRIMARY
    lower_is_better = False

    def configurations(self, cfg) -> list[str]:
        return list(study_arms(cfg))

    def reference(self, cfg) -> str:
        return reference_and_candidate(cfg)[0]

    def candidate(self, cfg) -> str:
        return reference_and_candidate(cfg)[1]

    def comparisons(self, cfg) -> list[dict]:
        return latentwire_comparisons(cfg)

    def setting(self, cfg) -> list[str]:
        data = describe_data(cfg.dataset, "built-in arithmetic word problems")
        arms = study_arms(cfg)
        by_shape: dict[tuple, list[int]] = {}
        for k in sorted({a.num_queries for a in arms.values()}):
            t = translator_shape(cfg, k)
            by_shape.setdefault((t.bottleneck, t.depth, t.heads), []).append(k)
        sizes = "; ".join(f"K = {', '.join(map(str, ks))}: width {b}, {plural(d, 'block')}, {plural(h, 'head')}"
                          for (b, d, h), ks in by_shape.items())
        return [f"Source model (frozen): {describe_model(cfg.source_model, cfg.source)}; the translator reads its "
                f"hidden states at layer {cfg.source_layer}.",
                f"Target model (frozen): {describe_model(cfg.target_model, cfg.target)}.",
                f"Data: {data}; at most {cfg.num_train:,} training items, {cfg.num_val} held-out items evaluated "
                f"during training, {cfg.num_eval} test items every system answers ({cfg.n_shot}-shot text prompts).",
                f"Translators ({sizes}), trained on the target's answer loss; {cfg.mode.replace('_', ' ')} unless "
                "the arm's name says otherwise.",
                f"Training: {cfg.train.describe()}. Without the stability fixes (`baseline_*` arms): no InfoNCE, no "
                "early stopping, the last weights kept; with them: InfoNCE"
                + (f" at weight {cfg.info_nce_weight:g}" if cfg.info_nce_weight else " (weight 0 here)")
                + " and the weights of the best held-out accuracy restored.",
                f"Seeds: {len(cfg.seeds)} ({', '.join(map(str, cfg.seeds))}); every system answers the same test items "
                "(paired over items and seeds)."]

    def table_metrics(self, cfg) -> list[str]:
        return ["bridged/acc_flexible", "bridged/acc_strict", "zero_prefix/acc_flexible",
                "shuffled_source/acc_flexible", "token_budget/acc_flexible", "target_text/acc_flexible",
                "source_text/acc_flexible", "bridged/compression", "bridged/kv_bytes_saved", "train_time_s"]

    def change_metrics(self, cfg) -> list[str]:
        return ["bridged/acc_flexible", "bridged/acc_strict", "bridged/invalid_rate"]

    # -----------------------------------------------------------------------------------------------

    def prepare(self, cfg: LatentWireStudyConfig, run: RunDir, display: Display) -> _Context:
        sides, setup = {}, {}
        for role, name, base in (("source", cfg.source_model, cfg.source), ("target", cfg.target_model, cfg.target)):
            started = time.perf_counter()
            path = str(pretrained_tiny(base, display=display)) if name == "builtin" else name
            setup[f"{role}_pretrain_s"] = time.perf_counter() - started
            info = Path(path) / "lmlab_pretrain.json"
            if name == "builtin" and info.exists():
                setup[f"{role}_pretrain"] = json.loads(info.read_text(encoding="utf-8"))
            started = time.perf_counter()
            model = load_causal_lm(path, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code).to(D.device())
            sides[role] = _Side(path, model, load_tokenizer(path, trust_remote_code=cfg.trust_remote_code))
            setup[f"{role}_load_s"] = time.perf_counter() - started
            setup[role] = path
        train_split = None if cfg.dataset == "builtin" else load_qa_items(cfg.dataset, "train")
        if cfg.dataset == "builtin":
            eval_items = generators.arithmetic_problems("test", cfg.num_eval, seed=0)
            exemplar_pool = generators.arithmetic_problems("train", max(100, 4 * cfg.n_shot), seed=0)
        else:
            eval_items = load_qa_items(cfg.dataset, "test")[: cfg.num_eval]
            exemplar_pool = train_split
        if len(eval_items) < 2:
            raise DataError(f"{cfg.dataset}: {len(eval_items)} test item(s); the evaluation needs at least 2")
        prompt = GSM8KPrompt(tuple(select_exemplars(exemplar_pool, cfg.n_shot, eval_items)))
        soft_with_text = max((a.num_queries for a in study_arms(cfg).values() if a.mode == "soft_plus_text"), default=0)
        for side in sides.values():
            _check_positions(side, prompt, eval_items, cfg.max_new_tokens + soft_with_text)
        return _Context(cfg, sides["source"], sides["target"], prompt, eval_items, setup, train_split)

    def _data(self, ctx: _Context, seed: int) -> tuple[list[dict], list[dict]]:
        """(training items, held-out validation items) for a seed; the validation items are never trained on."""
        cfg = ctx.cfg
        if ctx.train_split is None:
            pool = generators.arithmetic_problems("train", cfg.num_val + cfg.num_train, seed=seed)
        else:
            pool = random.Random(seed).sample(ctx.train_split, len(ctx.train_split))
        if len(pool) < cfg.num_val + 1:
            raise DataError(f"{cfg.dataset}: {len(pool)} training items cannot hold num_val={cfg.num_val} "
                            "validation items and a training set; lower num_val")
        return pool[cfg.num_val: cfg.num_val + cfg.num_train], pool[: cfg.num_val]

    def _evaluate(self, ctx: _Context, bridge: LatentWireBridge, arm: Arm) -> LatentWireEval:
        cfg = ctx.cfg
        run = partial(evaluate_latentwire, bridge, ctx.eval_items, batch_size=cfg.eval_batch_size,
                      max_new_tokens=cfg.max_new_tokens)
        parts = []
        for system in TEXT_SYSTEMS:  # deterministic and translator-free: computed once per direction (and K)
            key = (arm.swapped, system, arm.num_queries if system == "token_budget" else None)
            if key not in ctx.text_evals:
                ctx.text_evals[key] = shared = run(systems=(system,))
                tag = "/".join([system, "swapped" if arm.swapped else "forward", *(
                    [f"k{arm.num_queries}"] if system == "token_budget" else [])])
                for sample in shared.samples:  # names the shared evaluation in every cell's file (summarize-eval)
                    sample["systems"][system]["evaluation"] = tag
            parts.append(ctx.text_evals[key])
        parts.append(run(systems=BRIDGE_SYSTEMS))
        return merge_evaluations(parts)

    def run_cell(self, ctx: _Context, config: str, seed: int, cell_dir: Path, display: Display) -> CellOutput:
        cfg = ctx.cfg
        arm = study_arms(cfg)[config]
        source, target = (ctx.target, ctx.source) if arm.swapped else (ctx.source, ctx.target)
        encoder = PromptEncoder(source.tokenizer, target.tokenizer, ctx.prompt, arm.mode, arm.num_queries)
        shape = translator_shape(cfg, arm.num_queries)
        D.seed_everything(seed)  # the translator's initialisation depends on the seed
        translator = build_translator(source.model, target.model, shape)
        bridge = LatentWireBridge(source.model, target.model, translator, encoder, cfg.source_layer)
        train_items, val_items = self._data(ctx, seed)
        result = train_translator(
            bridge, train_items, val_items, cfg.train, loss_weights(cfg, len(train_items)), seed=seed,
            stability_fixes=arm.fixes, val_batch_size=cfg.eval_batch_size, val_max_new_tokens=cfg.max_new_tokens,
            metrics_path=cell_dir / "metrics.jsonl", samples_dir=cell_dir / "validation",
            checkpoint_dir=cell_dir / TRAIN_STATE, display=display)
        started = time.perf_counter()
        evaluation = self._evaluate(ctx, bridge, arm)
        eval_time = time.perf_counter() - started
        if D.is_main():
            write_eval_samples(cell_dir / SAMPLES_FILE, evaluation.samples)
        metrics = {**evaluation.metrics, "train_time_s": result.train_time_s, "eval_time_s": eval_time,
                   "train_loss": result.final_loss, "train_steps": result.steps, "peak_mem_mb": result.peak_mem_mb,
                   "train_tokens_per_s": result.tokens / max(result.train_time_s, 1e-9)}
        if result.best is not None:
            metrics.update(best_val_acc=result.best["val_acc"], best_step=result.best["step"])
        params = parameter_count(translator, trainable_only=True)
        details = {"arm": asdict(arm), "translator": shape.model_dump(), "eval_items": len(ctx.eval_items),
                   "stopped_early": result.stopped_early, "notes": evaluation.notes, "setup": ctx.setup}
        return CellOutput(metrics=metrics, details=details,
                          params={"trainable_params": params, "component_params": params})

    # -----------------------------------------------------------------------------------------------

    def extra_summary(self, summary: dict, rows: list[dict], run: RunDir, record: dict) -> dict:
        ok = [r for r in rows if r["status"] == "ok" and r.get("details", {}).get("arm")]
        items = item_statistics(run, ok, record["configurations"])
        cfg = record["config"]
        curves = {c: validation_curves(run, c) for c in record["configurations"]}
        extra = {"paired_items": items,
                 "claims": latentwire_claims(cfg, items, per_seed_values(ok), summary, curves, ok)}
        return {**extra, **fixes_without_collapse(summary, cfg, curves, ok)}

    def report_sections(self, summary: dict, rows: list[dict], run: RunDir, record: dict) -> list[str]:
        ok = [r for r in rows if r["status"] == "ok" and r.get("details", {}).get("arm")]
        if not ok:
            return []
        configs = [c for c in record["configurations"] if any(r["config"] == c for r in ok)]
        items = summary.get("paired_items", {})
        lines = _bridge_section(items, configs)
        lines += _baselines_section(items, configs)
        lines += _systems_section(ok, configs, items)
        if _compression_plot(ok, run):
            why = {r["config"]: "in the other direction" if r["details"]["arm"]["swapped"] else "without the fixes"
                   for r in ok if not r["details"]["arm"]["fixes"] or r["details"]["arm"]["swapped"]}
            left_out = [f"`{c}` ({why[c]})" for c in sorted(why)]
            lines += ["## Accuracy and KV cache vs compression", "",
                      "Over the arms with the stability fixes (`stable_*`), whose K varies"
                      + (f" ({', '.join(left_out)} {'is' if len(left_out) == 1 else 'are'} in the tables above, not "
                         "in the plot)" if left_out else "")
                      + ": accuracy of bridged, its two controls and token_budget (mean over seeds, 95% Wilson "
                      "interval over the items) against compression (text context tokens / context positions), with "
                      "target_text (the question as text, compression 1) as a horizontal line; and KV-cache bytes "
                      "saved per item against `target_text`. See `plots/accuracy_vs_compression.png`.", ""]
        if _training_plot(configs, run):
            lines += ["## Bridged accuracy over training", "",
                      "Bridged flexible accuracy on held-out training items at every evaluation, mean over seeds, "
                      "with (`stable_*`) and without (`baseline_*`) the stability fixes. A `stable_*` arm restores "
                      "its best point's weights at the end (and early stopping ends its curve early where its "
                      "patience allows); a `baseline_*` arm keeps its last weights. See "
                      "`plots/bridged_accuracy_over_training.png`.", ""]
        lines += _timing_section(ok, configs, record.get("started"))
        return lines


# ---------------------------------------------------------------------------------------------------
# Report sections


def _pooled(rows: list[dict], system: str, metric: str = "acc_flexible") -> tuple[int, int]:
    """(correct, items) of a system over the cells in `rows` (accuracy x items per cell, summed); a text-only system
    is one evaluation shared by the cells and is counted once."""
    cells = rows[:1] if system in TEXT_SYSTEMS else rows
    correct = sum(round(r["metrics"][f"{system}/{metric}"] * r["details"]["eval_items"]) for r in cells)
    return correct, sum(r["details"]["eval_items"] for r in cells)


def _wilson_pooled(rows: list[dict], system: str) -> tuple[float, list[float]]:
    """(accuracy, Wilson interval) from the cells' metrics, where their eval_samples files are missing."""
    correct, total = _pooled(rows, system)
    items = rows[0]["details"]["eval_items"]
    accuracy = correct / total
    return accuracy, stats.wilson_interval(accuracy * items, items)


COMPARED = ("zero_prefix", "shuffled_source", "target_text", "source_text", "token_budget")  # bridged vs each


def cell_outcomes(run: RunDir, rows: list[dict], config: str, key: str = "correct_flexible") -> dict | None:
    """{system: seeds x items 0/1 array} of a configuration's finished cells (seed order), read from their
    eval_samples.jsonl; a text-only system, one evaluation copied into every cell, is a single row. None when a
    cell's file is missing."""
    cells = sorted((r for r in rows if r["config"] == config and r["status"] == "ok"), key=lambda r: r["seed"])
    columns: dict[str, list[list[int]]] = {}
    for r in cells:
        path = run.cell_dir(config, r["seed"]) / SAMPLES_FILE
        if not path.is_file():
            return None
        samples = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        for system in SYSTEMS:
            if samples and all(system in sample["systems"] for sample in samples):
                row = [int(bool(sample["systems"][system][key])) for sample in samples]
                if system in TEXT_SYSTEMS and row in columns.get(system, []):
                    continue  # the shared evaluation again: counted once
                columns.setdefault(system, []).append(row)
    return {system: np.array(m) for system, m in columns.items()} if cells else None


def paired_tests(outcomes: dict, seeds: list[int]) -> dict:
    """Bridged vs each control and text baseline on the same items: pooled over seeds (per-item outcomes averaged
    over seeds, paired bootstrap interval, sign-flip p; `stats.paired_item_difference`) and per cell (exact McNemar
    on the cell's discordant items)."""
    bridged = outcomes["bridged"]
    tests = {}
    for other in COMPARED:
        if other not in outcomes:
            continue
        rows = outcomes[other]
        cells = []
        for i, seed in enumerate(seeds):
            first, second = bridged[i], rows[min(i, len(rows) - 1)]
            better, worse = int(np.sum((first == 1) & (second == 0))), int(np.sum((first == 0) & (second == 1)))
            cells.append({"seed": seed, "better": better, "worse": worse, "difference": (better - worse) / first.size,
                          "p_value": stats.mcnemar_exact(better, worse)})
        tests[other] = {**stats.paired_item_difference(bridged, rows), "shared": other in TEXT_SYSTEMS,
                        "cells": cells}
    return tests


def configuration_statistics(flexible: dict, strict: dict, seeds: list[int]) -> dict:
    """One configuration's entry of summary["paired_items"] from its `cell_outcomes` (flexible and strict): each
    system's accuracy with an interval over items, and bridged's paired tests against the controls and the text
    baselines."""
    return {"seeds": seeds, "items": int(flexible["bridged"].shape[1]),
            "accuracy": {s: stats.item_accuracy_interval(m) for s, m in flexible.items()},
            "accuracy_strict": {s: stats.item_accuracy_interval(m) for s, m in strict.items()},
            "bridged_vs": paired_tests(flexible, seeds),
            # the source reading the text against the floor, paired per item: how far it solves the task at all
            "source_vs": {c: stats.paired_item_difference(flexible["source_text"], flexible[c])
                          for c in FLOOR_CONTROLS if "source_text" in flexible and c in flexible}}


def item_statistics(run: RunDir, rows: list[dict], configs: list[str]) -> dict:
    """summary["paired_items"]: `configuration_statistics` of each configuration whose cells' samples are on disk."""
    out = {}
    for config in configs:
        flexible = cell_outcomes(run, rows, config)
        if not flexible or "bridged" not in flexible:
            continue
        strict = cell_outcomes(run, rows, config, key="correct_strict") or {}
        seeds = sorted(r["seed"] for r in rows if r["config"] == config and r["status"] == "ok")
        out[config] = configuration_statistics(flexible, strict, seeds)
    return out


# ---------------------------------------------------------------------------------------------------
# The notes' claims (docs/studies.md, claims of the research notes: L1-L6)

NOTES_BRIDGED, NOTES_TEXT, NOTES_COLLAPSED, NOTES_FIXED = 0.815, 0.73, 0.36, 0.70  # L1, L2 (GSM8K, 64 tokens)
NOTES_K32, NOTES_K64 = 0.55, 0.75  # L3: accuracy with 32 and 64 soft tokens
NOTES_SWAPPED, NOTES_FORWARD_FINAL = 0.005, 0.645  # L6 (soft only) and L5's final forward accuracy
NOTES_SOURCE = 0.540  # L5: the source reading the text


def _points(test: dict, what: str) -> str:
    """'bridged - x -14.5 [-19.2, -9.8] percentage points (p <= 0.0001; 200 items x 3 seeds)'."""
    return (f"{what} {pp_interval(test['difference'], test['ci95'])} percentage points ({p_text(test['p_value'])}; "
            f"{test['items']} items x {test['seeds'][0]} seeds)")


def validation_curves(run: RunDir, config: str) -> dict[int, dict[int, float]]:
    """{seed: {step: val_acc}} of a configuration's cells (`report.seed_curves`; a step logged twice, as a resumed
    cell may, counts its last value)."""
    return {seed: {step: values[-1] for step, values in curve.items()}
            for seed, curve in seed_curves(run, config, "eval", "val_acc").items()}


def fall_noise(peak: float, last: float, items: int) -> float:
    """The 95% bound of the difference between two accuracies on `items` validation items each, as if
    independent (Wald): a fall from the peak smaller than this is within the items' sampling noise. Both accuracies
    are measured on the same items, which only makes their difference less noisy, so the bound errs towards calling
    a fall noise."""
    return stats.Z95 * (max(peak * (1 - peak) + last * (1 - last), 0.0) / items) ** 0.5


def collapse_check(curves: dict[int, dict[int, float]], patience: int | None, items: int) -> dict | None:
    """Did the configuration without the fixes collapse? Per seed, its validation accuracy's fall from its peak to
    its last evaluation, and whether that fall exceeds the sampling noise of the `items` validation items
    (`fall_noise`) - the peak is the best of several noisy evaluations, so a small fall is expected without any
    collapse; and whether early stopping could end a run before its last evaluation at all (patience below the
    evaluations after the first)."""
    if not curves:
        return None
    drops, noise = {}, {}
    for seed, curve in curves.items():
        values = [curve[step] for step in sorted(curve)]
        drops[seed] = max(values) - values[-1]
        noise[seed] = fall_noise(max(values), values[-1], items)
    evaluations = min(len(c) for c in curves.values())
    return {"drops": drops, "fell": sum(d > 0 for d in drops.values()),
            "collapsed": sum(drops[seed] > noise[seed] for seed in drops), "seeds": len(drops),
            "largest_drop": max(drops.values()), "items": items, "noise": min(noise.values()),
            "evaluations": evaluations, "patience": patience,
            "can_stop_early": patience is not None and patience < evaluations - 1}


def fixes_acted(rows: list[dict], config: str, info_nce_weight: float = 0.05) -> str:
    """What the stability fixes did in `config`'s finished cells: how many runs early stopping ended early, and in how
    many restoring the best weights went back to an earlier evaluation than the last (best_step < train_steps) -
    where neither happened, only InfoNCE acted (none of the three where its weight is 0). "" without cells."""
    cells = [r for r in rows if r["config"] == config and r["status"] == "ok"]
    if not cells:
        return ""
    stopped = sum(bool(r["details"].get("stopped_early")) for r in cells)
    back = [r["metrics"]["train_steps"] - r["metrics"]["best_step"] for r in cells
            if r["metrics"].get("best_step") is not None and r["metrics"].get("train_steps") is not None
            and r["metrics"]["best_step"] < r["metrics"]["train_steps"]]
    said = (f"what the fixes did in `{config}`: early stopping ended {stopped} of {len(cells)} runs early; restoring "
            f"the best weights went back to an earlier evaluation in {len(back)} of {len(cells)}"
            + (f" (by up to {max(back)} steps; the first of equal accuracies is kept)" if back else ""))
    if not stopped and not back:
        said += (", so of the three fixes only InfoNCE acted" if info_nce_weight > 0 else
                 ", and InfoNCE's weight is 0: none of the three fixes acted")
    return said


def _l2_with_collapse(claim: dict, check: dict | None, baseline: str) -> dict:
    """L2's verdict where the baseline's curve shows whether there was a collapse for the fixes to prevent."""
    if check is None:
        return claim
    stop = ("" if check["can_stop_early"] else
            f"; early stopping could not end a run early either (patience {check['patience']} with "
            f"{check['evaluations']} evaluations)")
    if not check["collapsed"]:
        if not check["fell"]:
            how = (f"its validation accuracy was at its peak at its last evaluation on every seed ({check['seeds']} "
                   f"of {check['seeds']})")
        else:
            how = (f"its validation accuracy fell from its peak to its last evaluation on {check['fell']} of "
                   f"{check['seeds']} seeds, by at most {check['largest_drop']:.3f}, within the sampling noise of "
                   f"{check['items']} validation items (a fall must exceed about {check['noise']:.2f} to stand out "
                   "from it)")
        verdict = (f"not testable here: `{baseline}` did not collapse - {how}, so the fixes had no collapse to prevent "
                   "and the comparison measures what the fixes do to a run that does not collapse (InfoNCE, "
                   "best-weight restoring, and early stopping where it fired)" + stop)
        return {**claim, "verdict": verdict}
    fell = (f"; `{baseline}`'s validation accuracy fell from its peak to its last evaluation by more than the "
            f"sampling noise of {check['items']} validation items on {check['collapsed']} of {check['seeds']} seeds "
            f"(by up to {check['largest_drop']:.3f})" + stop)
    return {**claim, "verdict": claim["verdict"] + fell}


def baseline_collapse(cfg: dict, curves: dict[str, dict[int, dict[int, float]]] | None) -> tuple[str, dict | None]:
    """(the stability baseline's name, `collapse_check` of its validation curves under the run's patience and
    validation items): what L2's verdict and the fixes' sentences read."""
    baseline = Arm(cfg["num_queries"], False, cfg["mode"]).name
    patience = cfg.get("train", {}).get("early_stopping_patience")
    return baseline, collapse_check((curves or {}).get(baseline, {}), patience, cfg["num_val"])


def fixes_without_collapse(summary: dict, cfg: dict, curves: dict[str, dict[int, dict[int, float]]],
                           rows: list[dict] = ()) -> dict:
    """The stability fixes' sentences (the decision's, the attribution's) where their baseline did not collapse:
    the fixes had nothing to prevent, so the comparison cannot speak to the notes' claim (L2); with the cells' `rows`
    also the change in percentage points of accuracy (the relative change above is of an accuracy) and which of the
    fixes acted (`fixes_acted`). Returns the summary entries to replace (`decision`, `comparisons`), or nothing."""
    stable = Arm(cfg["num_queries"], True, cfg["mode"]).name
    baseline, check = baseline_collapse(cfg, curves)
    if check is None or check["collapsed"]:
        return {}
    note = (f" `{baseline}` did not collapse in this run (claim L2 below), so the fixes had no collapse to prevent: "
            "this measures what they do to a run that does not collapse.")
    metric = summary.get("primary_metric", "bridged/acc_flexible")
    per_seed = per_seed_values(list(rows))
    with_fixes, without = (per_seed.get(c, {}).get(metric, {}) for c in (stable, baseline))
    diffs = [100 * (a - without[seed]) for seed, a in with_fixes.items() if seed in without]
    if diffs:
        note += (f" In points of accuracy: {sum(diffs) / len(diffs):+.1f} (mean over {len(diffs)} seeds of "
                 f"`{stable}` - `{baseline}`).")
    acted = fixes_acted(list(rows), stable, cfg.get("info_nce_weight", 0.05))
    if acted:
        note += f" {acted[0].upper()}{acted[1:]}."

    def noted(entry: dict) -> dict:
        if (entry.get("candidate"), entry.get("parent", entry.get("reference"))) != (stable, baseline):
            return entry
        return {**entry, "text": entry["text"] + note}

    out = {"comparisons": [noted(c) for c in summary.get("comparisons", [])]}
    if summary.get("decision"):
        out["decision"] = noted(summary["decision"])
    return out


def second_half_gain(curves: dict[int, dict[int, float]]) -> dict | None:
    """How much a configuration's validation accuracy rose over the second half of its training: per seed, the value
    at its last evaluation minus the value at the first evaluation at or after half the last one's step (steps every
    seed evaluated), and the mean over seeds with a 95% t-interval - paired by seed, so the items' and the seeds'
    levels cancel. An interval above 0: the configuration still improved over the second half, so the run shows no
    converged configuration (it does not say the curve was still rising at its very end). None without two shared
    evaluations."""
    if not curves:
        return None
    steps = sorted(set.intersection(*(set(c) for c in curves.values())))
    if len(steps) < 2:
        return None
    middle = second_half_start(steps)
    gains = [c[steps[-1]] - c[middle] for c in curves.values()]
    return {"middle": middle, "last": steps[-1], "seeds": len(gains), "mean": fmean(gains),
            "ci95": stats.t_interval(gains)}


def _improving(arms: dict[str, dict | None]) -> str:
    """The clause L3 gets from its arms' `second_half_gain`: whether the compared configurations still improved
    over the second half of their training, which makes the comparison one of K at this training budget. (A gain
    over the second half does not say the curve was still rising at its very end; it says the run did not show a
    converged arm.)"""
    arms = {name: gain for name, gain in arms.items() if gain and gain["ci95"]}
    if not arms:
        return ""
    first = next(iter(arms.values()))
    parts = ", ".join(f"`{name}` {pp_interval(g['mean'], g['ci95'])}" for name, g in arms.items())
    rising = [name for name, g in arms.items() if g["ci95"][0] > 0]
    span = (f"bridged validation accuracy from step {first['middle']} to step {first['last']}, paired over "
            f"{first['seeds']} seeds: {parts} percentage points")
    if not rising:
        return (f"; neither arm improved significantly over the second half of training ({span}), which does not "
                "show that they had stopped improving")
    who = "both arms" if len(rising) == len(arms) > 1 else " and ".join(f"`{n}`" for n in rising)
    return (f"; {who} still improved significantly over the second half of training ({span}), so more training "
            "might change this comparison: it compares K at this training budget, not what K soft tokens can carry "
            "once trained")


def latentwire_claims(cfg: dict, items: dict, values: dict, summary: dict,
                      curves: dict[str, dict[int, dict[int, float]]] | None = None,
                      rows: list[dict] | None = None) -> list[dict]:
    """L1-L6 against this run: each with what was measured and a verdict (`attribution.interval_verdict`).

    System comparisons within a configuration (L1, L5) are paired over items; effects between configurations (L2,
    L3, L6: trained separately) are paired over seeds, the unit of replication of a training run."""
    k = cfg["num_queries"]
    mode = cfg["mode"]
    main = Arm(k, True, mode).name
    claims = []
    setting = "Mistral-7B -> Llama-3.1-8B, GSM8K, 64 soft tokens"
    # where this run's scale differs from the notes' (the whole setting is under Setting)
    def named(key: str, builtin: str) -> str:
        return builtin if cfg.get(key, "builtin") == "builtin" else f"`{cfg[key]}`"

    differs = [f"{words} (the notes: {notes})" for words, notes, same in (
        (f"source {named('source_model', 'a tiny model built here')}", "Mistral-7B",
         "mistral" in str(cfg.get("source_model", "")).lower()),
        (f"target {named('target_model', 'a tiny model built here')}", "Llama-3.1-8B",
         "llama" in str(cfg.get("target_model", "")).lower()),
        (f"data {named('dataset', 'generated arithmetic problems')}", "GSM8K",
         "gsm8k" in str(cfg.get("dataset", "")).lower()),
        (f"{k} soft tokens", 64, k == 64)) if not same]
    if differs:
        setting += f"; this run differs: {', '.join(differs)}"

    def item_claim(cid: str, claim: str, config: str, other: str, claimed: float) -> dict:
        test = items.get(config, {}).get("bridged_vs", {}).get(other)
        row = {"id": cid, "claim": claim, "setting": setting}
        if test is None:
            return {**row, "measured": "not run", "verdict": f"not testable here: `{config}` did not run"}
        claimed_pp = 100 * claimed
        verdict = interval_verdict([100 * b for b in test["ci95"]], claimed_pp,
                                   f"the claimed {claimed_pp:+.1f} percentage points")
        floor = source_at_floor(items[config])
        if floor is not None and claimed > 0 and verdict.startswith(("not supported", "not testable")):
            # above the text baseline needs the source to add what the target lacks; a source at the floor cannot
            verdict = (f"not testable at this scale: {floor}, so the bridge can at best carry the question, not add "
                       f"the source's answer to the target's; the interval alone reads: {verdict}")
        return {**row, "measured": _points(test, f"`{config}` bridged - {other}"), "verdict": verdict}

    claims.append(item_claim("L1", "bridged accuracy 81.5% above the 73% text baseline", main, "target_text",
                             NOTES_BRIDGED - NOTES_TEXT))
    lw = {"metric": PRIMARY, "setting": setting}
    baseline, collapse = baseline_collapse(cfg, curves)
    l2 = judge_claim({**lw, "id": "L2", "candidate": main, "parent": baseline,
                      "claim": "with the stability fixes bridged accuracy stays > 70%; without them it collapses to "
                               "36%", "claimed_pct": 100 * (NOTES_FIXED / NOTES_COLLAPSED - 1)},
                     values, [], lower_is_better=False)
    if baseline in values:
        l2 = _l2_with_collapse(l2, collapse, baseline)
    acted = fixes_acted(rows or [], main, cfg.get("info_nce_weight", 0.05))
    if acted:
        l2 = {**l2, "verdict": f"{l2['verdict']}; {acted}"}
    claims.append(l2)
    ks = sorted(set(cfg["compression_k"]))
    if "compression" in cfg["ablation"] and len(ks) >= 2:
        fewer, more = Arm(ks[0], True, mode).name, Arm(ks[-1], True, mode).name
        l3 = judge_claim({**lw, "id": "L3", "candidate": fewer, "parent": more,
                          "claim": "fewer soft tokens trade accuracy for compression (32 tokens ~55%, 64 tokens ~75%)",
                          "claimed_pct": 100 * (NOTES_K32 / NOTES_K64 - 1),
                          "claimed_text": f"the notes' {100 * (NOTES_K32 / NOTES_K64 - 1):+.1f}% (55% at 32 soft "
                                          f"tokens vs 75% at 64; this run compares {ks[0]} with {ks[-1]})"},
                         values, [], lower_is_better=False)
        if fewer in values and more in values:
            l3["verdict"] += _improving({c: second_half_gain((curves or {}).get(c, {})) for c in (fewer, more)})
        claims.append(l3)
    else:
        claims.append({"id": "L3", "claim": "fewer soft tokens trade accuracy for compression", "setting": setting,
                       "measured": "not run", "verdict": "not testable here: the compression ablation did not run "
                                                         "with two K (ablation=compression, compression_k=[...])"})
    claims.append(_kv_claim(main, summary, setting))
    claims.append(_between_claim(main, items, setting))
    swapped = Arm(k, True, mode, swapped=True).name
    if "swap" in cfg["ablation"]:
        claims.append(judge_claim({**lw, "id": "L6", "candidate": swapped, "parent": main,
                                   "claim": "the swapped direction collapses (soft only <= 0.005)",
                                   "claimed_pct": 100 * (NOTES_SWAPPED / NOTES_FORWARD_FINAL - 1)},
                                  values, [], lower_is_better=False))
    else:
        claims.append({"id": "L6", "claim": "the swapped direction collapses (soft only <= 0.005)", "setting":
                       "phase 2, Llama -> Mistral", "measured": "not run",
                       "verdict": "not testable here: the swap ablation did not run (add ablation=[..., swap])"})
    return claims


def _kv_claim(config: str, summary: dict, setting: str) -> dict:
    row = {"id": "L4", "claim": "43-59 MB of KV cache saved per inference with soft tokens", "setting": setting}
    metrics = summary["configs"].get(config, {}).get("metrics", {})
    saved, full = metrics.get("bridged/kv_bytes_saved"), metrics.get("target_text/kv_bytes")
    if not saved or not full:
        return {**row, "measured": "not run", "verdict": f"not testable here: `{config}` did not run"}
    saved, full = saved["mean"], full["mean"]
    measured = (f"`{config}`: {fmt(saved)} bytes saved per item vs target_text's {fmt(full)} "
                f"({100 * saved / full:.1f}%; computed from the prompts and the model configs, not sampled)")
    source = metrics.get("source_text/kv_bytes")
    source_text = (f"; the source still reads the whole prompt once to give the translator its hidden states (its "
                   f"cache, were it kept, would take {fmt(source['mean'])} bytes)" if source else "")
    verdict = ("not testable at this scale: the notes' megabytes are for 7-8B models and 64 tokens; that soft tokens "
               "save cache holds by construction - the target's cache holds K soft tokens instead of the prompt, so "
               "it is smaller wherever K is shorter than the prompt (computed, not measured)" + source_text
               if saved > 0 else
               "not supported: the soft tokens save no KV cache here (K is not shorter than the prompt)")
    return {**row, "measured": measured, "verdict": verdict}


FLOOR_CONTROLS = ("zero_prefix", "shuffled_source")  # the target given nothing about the item: the task's floor


FLOOR_POINTS = 0.10  # the source "barely solves" the task: at most 10 points above a no-information control


def source_at_floor(entry: dict) -> str | None:
    """Why "bridged above the source" says nothing here, or None: the source reading the text barely solves the task
    where its 95% interval (Wilson over items) overlaps a floor control's (`FLOOR_CONTROLS`) and, paired per item
    (`source_vs`), it is at most FLOOR_POINTS above each such control (the upper end of the paired 95% interval;
    records without the paired test rest on the overlap alone). That is a judgement of size, not a test: the clause
    gives the paired differences, which can exclude 0 where a few more items are solved; token_budget, which reads
    part of the question, is no floor."""
    accuracy = entry.get("accuracy", {})
    source = accuracy.get("source_text")
    overlapping = [c for c in FLOOR_CONTROLS if source and c in accuracy and
                   accuracy[c]["ci95"][1] >= source["ci95"][0]]
    paired = [(c, t) for c, t in entry.get("source_vs", {}).items() if c in overlapping]
    if not overlapping or any(t["ci95"][1] >= FLOOR_POINTS for _, t in paired):
        return None
    controls = " and ".join(f"{c}'s {_acc(accuracy[c])}" for c in overlapping)

    def reading(t: dict) -> str:
        if t.get("p_value") is None:
            return "no p-value"
        excludes, small_p = t["ci95"][0] > 0 or t["ci95"][1] < 0, t["p_value"] < 0.05
        if excludes != small_p:
            return (f"{p_text(t['p_value'])}, marginal: " + (
                "the bootstrap interval excludes 0 while the permutation test's p is above 0.05" if excludes else
                "the permutation test's p is below 0.05 while the bootstrap interval holds 0"))
        return p_text(t["p_value"]) + ("" if excludes else ", not significant")
    above = " and ".join(f"{pp_interval(t['difference'], t['ci95'])} points vs {c} ({reading(t)})" for c, t in paired)
    bound = (f"at most {100 * max(t['ci95'][1] for _, t in paired):.1f} points above the controls that carry nothing "
             f"about the item (the upper ends of its paired 95% intervals)" if paired else
             "not clearly above the controls that carry nothing about the item")
    return (f"the source barely solves the task here: source_text {_acc(source)}, unlike the notes' source at "
            f"{NOTES_SOURCE:.3f}, is {bound} - its 95% interval overlaps {controls}"
            + (f"; paired per item it differs by {above}" if above else ""))


def _between_claim(config: str, items: dict, setting: str) -> dict:
    row = {"id": "L5", "claim": f"bridged 0.645 final (0.680 peak) lies between source {NOTES_SOURCE:.3f} and "
                                "target 0.770", "setting": setting}
    vs = items.get(config, {}).get("bridged_vs", {})
    if "source_text" not in vs or "target_text" not in vs:
        return {**row, "measured": "not run", "verdict": f"not testable here: `{config}` did not run"}
    src, tgt = vs["source_text"], vs["target_text"]
    measured = f"{_points(src, 'bridged - source_text')}; {_points(tgt, 'bridged - target_text')}"
    floor = source_at_floor(items[config])
    if src["ci95"][0] > 0 and tgt["ci95"][1] < 0:
        verdict = ("supported: bridged is significantly above the source and below the target" if floor is None else
                   "not testable at this scale: bridged is significantly below the target, but \"above the source\" "
                   f"is trivially met - {floor}")
    elif src["ci95"][1] < 0 or tgt["ci95"][0] > 0:
        verdict = "not supported: bridged is significantly outside the source-target range"
    else:
        verdict = "not testable at this scale: an interval holds 0" + ("" if floor is None else f"; {floor}")
    verdict += (f"; the peak-to-final drop cannot show in `{config}`: it restores its best-validation weights (L2 "
                "reads the drop in the arms without the fixes)")
    return {**row, "measured": measured, "verdict": verdict}


def _acc(entry: dict | None) -> str:
    """'0.260 [0.204, 0.325]', marked when it is one measurement shared by the seeds."""
    if not entry:
        return "-"
    low, high = entry["ci95"]
    return f"{entry['accuracy']:.3f} [{low:.3f}, {high:.3f}]" + (" (shared)" if entry["seeds"] == 1 else "")


def pp_interval(difference: float, ci95: list[float]) -> str:
    """'+25.5 [+19.0, +32.0]': a difference of two accuracies (fractions) and its interval, in percentage points."""
    return f"{100 * difference:+.1f} [{100 * ci95[0]:+.1f}, {100 * ci95[1]:+.1f}]"


def _diff(test: dict) -> str:
    """'+25.5 [+19.0, +32.0] (p = 0.0001)': bridged minus the other system, in percentage points."""
    return f"{pp_interval(test['difference'], test['ci95'])} ({p_text(test['p_value'])})"


def p_text(p: float) -> str:
    """A permutation p-value: its floor (one in resamples + 1) reads as a bound, not as an exact value."""
    floor = 1 / (stats.BOOTSTRAP_RESAMPLES + 1)
    return f"p <= {floor:.1g}" if p <= floor * (1 + 1e-9) else f"p = {p:.2g}"


def above(test: dict) -> bool:
    return test["ci95"][0] > 0


def _bridge_section(items: dict, configs: list[str]) -> list[str]:
    lines = ["## Does information cross the bridge?", "",
             "Bridged accuracy against its two controls (zero soft tokens; the source reading another item) on the "
             "same items. Accuracy: mean over seeds, 95% Wilson interval over the items (an item counts once however "
             "many seeds evaluated it). Difference: bridged minus control in percentage points of accuracy, paired "
             "per item (each item's outcomes averaged over seeds), 95% paired-bootstrap interval and sign-flip "
             "permutation p-value. Per cell: exact McNemar test on the cell's discordant items. "
             "Information crossed the bridge only where the difference's interval lies above 0 for both controls.", "",
             "| configuration | items x seeds | bridged | zero_prefix | bridged - zero_prefix | shuffled_source | "
             "bridged - shuffled_source | above both controls | cells above both (McNemar p < 0.05) |",
             "|---|---|---|---|---|---|---|---|---|"]
    crossed, not_crossed = [], []
    for config in configs:
        entry = items.get(config)
        if not entry or not all(c in entry["bridged_vs"] for c in ("zero_prefix", "shuffled_source")):
            continue
        vs = entry["bridged_vs"]
        both = above(vs["zero_prefix"]) and above(vs["shuffled_source"])
        (crossed if both else not_crossed).append(f"`{config}`")
        per_cell = sum(all(vs[c]["cells"][i]["better"] > vs[c]["cells"][i]["worse"] and
                           vs[c]["cells"][i]["p_value"] < 0.05 for c in ("zero_prefix", "shuffled_source"))
                       for i in range(len(entry["seeds"])))
        lines.append(f"| {config} | {entry['items']} x {len(entry['seeds'])} | {_acc(entry['accuracy']['bridged'])} | "
                     f"{_acc(entry['accuracy']['zero_prefix'])} | {_diff(vs['zero_prefix'])} | "
                     f"{_acc(entry['accuracy']['shuffled_source'])} | {_diff(vs['shuffled_source'])} | "
                     f"{'yes' if both else 'no'} | {per_cell}/{len(entry['seeds'])} |")
    lines.append("")
    if crossed:
        lines.append(f"Information crossed the bridge (bridged above both controls): {', '.join(crossed)}.")
    if not_crossed:
        lines.append(f"Not shown to cross (an interval vs a control reaches 0 or below): {', '.join(not_crossed)}; "
                     "their bridged accuracy is not evidence of transferred information.")
    return [*lines, ""]


def _baselines_section(items: dict, configs: list[str]) -> list[str]:
    lines = ["## Bridged vs the text baselines", "",
             "The text-only systems do not involve the translator: each is one evaluation shared by every cell of a "
             "direction (token_budget: one per K), counted once (its interval is Wilson over items). Difference: "
             "bridged minus the baseline in percentage points of accuracy, paired per item as above; per cell: "
             "bridged-only correct items / baseline-only correct items and the exact McNemar p-value.", "",
             "| configuration | baseline | baseline accuracy | bridged | bridged - baseline [95% CI] (p) | per cell |",
             "|---|---|---|---|---|---|"]
    for config in configs:
        entry = items.get(config)
        for other in ("target_text", "source_text", "token_budget"):
            test = (entry or {}).get("bridged_vs", {}).get(other)
            if test is None:
                continue
            cells = "; ".join(f"seed {c['seed']}: +{c['better']}/-{c['worse']} (McNemar p = {c['p_value']:.2g})"
                              for c in test["cells"])
            lines.append(f"| {config} | {other} | {_acc(entry['accuracy'][other])} | "
                         f"{_acc(entry['accuracy']['bridged'])} | {_diff(test)} | {cells} |")
    return [*lines, ""]


def _systems_section(rows: list[dict], configs: list[str], items: dict) -> list[str]:
    lines = ["## Every system", "",
             "Per configuration and system: strict and flexible accuracy, mean over seeds with a 95% Wilson interval "
             "over the items (a text-only system is one shared evaluation, marked `(shared)`); the rest are means "
             "over seeds. Prompt tokens count the generating model's prompt "
             "(`source_text` in the source tokenizer); compression = text context tokens / context positions; "
             "KV bytes are the generating model's prompt cache (saved: vs `target_text`); latency is wall "
             "clock per item. A shared system answers the same in every row, but each process that ran cells "
             "generated it once more, so its latency and tokens/s are that run's: they differ between rows by "
             "timing noise alone.", "",
             "| configuration | system | acc strict | acc flexible | invalid | prompt tokens | compression | "
             "KV bytes | KV bytes saved | latency s | tokens/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for config in configs:
        cells = [r for r in rows if r["config"] == config]
        entry = items.get(config, {})
        for system in SYSTEMS:
            if f"{system}/acc_flexible" not in cells[0]["metrics"]:
                continue
            mean = {m: fmean([r["metrics"][f"{system}/{m}"] for r in cells])
                    for m in ("invalid_rate", "prompt_tokens", "compression", "kv_bytes", "kv_bytes_saved",
                              "latency_s", "tokens_per_s")}
            lines.append(f"| {config} | {system} | {_acc(entry.get('accuracy_strict', {}).get(system))} | "
                         f"{_acc(entry.get('accuracy', {}).get(system))} | {mean['invalid_rate']:.3f} | "
                         f"{mean['prompt_tokens']:.1f} | {mean['compression']:.2f} | {fmt(mean['kv_bytes'])} | "
                         f"{fmt(mean['kv_bytes_saved'])} | {mean['latency_s']:.4f} | {mean['tokens_per_s']:.1f} |")
    return [*lines, ""]


def _timing_section(rows: list[dict], configs: list[str], started: str | None = None) -> list[str]:
    """Where each model came from and what it cost, then each configuration's training and evaluation times. A cell
    records the seconds its own process took to pretrain or find a base: under `--parallel` the run's process builds
    a missing base before the workers start, so the cells' figure can be 0 for a base this run built - the base's
    build time (`built_at`, bases built since it is recorded) against the run's start (`started`) says which."""
    setups = [r["details"].get("setup", {}) for r in rows]
    setup = setups[0]
    lines = ["## Timings", ""]
    for role in ("source", "target"):
        info = setup.get(f"{role}_pretrain")
        cached = ""
        if info is not None:
            when = info.get("built_at")
            during = bool(when and started and when >= started)
            cached = (f"; pretrained tiny base: val ppl {info['val_ppl']:.3f}, {info['steps']} steps, "
                      f"{info['wall_time_s']:.0f} s when built"
                      + (f" ({'by this run, ' if during else ''}at {when.replace('T', ' ')})" if when else ""))
        taken = max(s.get(f"{role}_pretrain_s", 0) for s in setups)
        lines.append(f"- {role}: `{setup.get(role)}` (its cells' processes: at most {taken:.1f} s to pretrain or find "
                     f"in the cache, {setup.get(f'{role}_load_s', 0):.1f} s to load{cached})")
    lines += ["", "| configuration | train steps (mean) | train s (mean) | evaluation s (mean) | stopped early |",
              "|---|---|---|---|---|"]
    for config in configs:
        cells = [r for r in rows if r["config"] == config]
        lines.append(f"| {config} | {fmean([r['metrics']['train_steps'] for r in cells]):.0f} | "
                     f"{fmean([r['metrics']['train_time_s'] for r in cells]):.1f} | "
                     f"{fmean([r['metrics']['eval_time_s'] for r in cells]):.1f} | "
                     f"{sum(r['details']['stopped_early'] for r in cells)}/{len(cells)} |")
    return [*lines, ""]


def _compression_plot(rows: list[dict], run: RunDir) -> bool:
    """Accuracy and KV bytes saved vs compression over the forward `stable` arms of one mode (K varies). The systems
    are not configurations, so they have colours and markers of their own (the same in every run); a mode has its
    line style. The text systems are no arm of a mode (one evaluation per K, or one in all): each is drawn once,
    labelled by what its prompt holds."""
    groups: dict[str, dict[int, list[dict]]] = {}  # mode -> K -> cells
    for r in rows:
        arm = r["details"]["arm"]
        if arm["fixes"] and not arm["swapped"]:
            groups.setdefault(arm["mode"], {}).setdefault(arm["num_queries"], []).append(r)
    groups = {mode: by_k for mode, by_k in groups.items() if len(by_k) >= 2}
    if not groups:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    systems = {"bridged": ("#1b9e77", "o"), "token_budget": ("#d95f02", "s"), "zero_prefix": ("#7570b3", "^"),
               "shuffled_source": ("#e7298a", "D")}  # Dark2: apart from the configurations' tab10
    series = [(f"{system} ({mode})", system, by_k, style)
              for style, (mode, by_k) in zip(LINE_STYLES, groups.items(), strict=False) for system in BRIDGE_SYSTEMS]
    every_k: dict[int, list[dict]] = {}  # token_budget: one evaluation per K whatever the mode
    for by_k in groups.values():
        for k, cells in by_k.items():
            every_k.setdefault(k, []).extend(cells)
    series.append(("token_budget (the question's first K tokens as text)", "token_budget", every_k, LINE_STYLES[0]))
    fig, (acc_ax, kv_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    accuracy: dict[str, tuple] = {}
    outcomes = {cells[0]["config"]: cell_outcomes(run, cells, cells[0]["config"])
                for by_k in groups.values() for cells in by_k.values()}  # one configuration per mode and K
    for label, system, by_k, style in series:
        colour, marker = systems[system]
        ks = sorted(by_k)
        xs = [fmean([r["metrics"][f"{system}/compression"] for r in by_k[k]]) for k in ks]
        found = [outcomes[by_k[k][0]["config"]] for k in ks]
        # mean over seeds, Wilson over the items (seeds share the items; a text system is one evaluation)
        intervals = [stats.item_accuracy_interval(o[system]) if o else
                     dict(zip(("accuracy", "ci95"), _wilson_pooled(by_k[k], system), strict=True))
                     for k, o in zip(ks, found, strict=True)]
        ys = [iv["accuracy"] for iv in intervals]
        bounds = [iv["ci95"] for iv in intervals]
        # each seed's accuracy over the items (a trained system's seeds differ; a text system has one evaluation)
        per_seed = [[float(v) for v in np.asarray(o[system]).mean(axis=1)] if o and system in o else []
                    for o in found]
        accuracy[label] = (xs, ys, bounds, colour, marker, style, per_seed)
        if system == "bridged":
            for x, y, k in zip(xs, ys, ks, strict=True):
                acc_ax.annotate(f"K={k}", (x, y), textcoords="offset points", xytext=(4, 6), fontsize=7)
        if system in ("bridged", "token_budget"):  # in soft_only mode both prompts have 1 + K + cue positions
            saved = [[r["metrics"][f"{system}/kv_bytes_saved"] for r in by_k[k]] for k in ks]
            means = [fmean(v) for v in saved]
            spread = [[m - min(v) for m, v in zip(means, saved, strict=True)],
                      [max(v) - m for m, v in zip(means, saved, strict=True)]]
            kv_ax.errorbar(xs, means, yerr=spread if any(map(any, spread)) else None,
                           color=colour, marker=marker, fillstyle="none", linestyle=style, capsize=3,
                           # bridged drawn wide under token_budget, which often saves exactly as much
                           linewidth=4 if system == "bridged" else 1.5, markersize=10 if system == "bridged" else 6,
                           alpha=0.6 if system == "bridged" else 1.0)
    text = _pooled([r for cells in every_k.values() for r in cells], "target_text")
    acc_ax.axhline(text[0] / text[1], color="grey", linestyle=LINE_STYLES[0], linewidth=1,
                   label="target_text (the question as text, compression 1)")
    notes = same_values_notes({label: (xs, ys) for label, (xs, ys, *_) in accuracy.items()})
    every_x = [x for xs, *_ in accuracy.values() for x in xs]
    step = 0.01 * ((max(every_x) - min(every_x)) or max(every_x))  # 1% of the axis between neighbouring systems
    for i, (label, (xs, ys, bounds, colour, marker, style, per_seed)) in enumerate(accuracy.items()):
        errors = [[y - low for y, (low, _) in zip(ys, bounds, strict=True)],
                  [high - y for y, (_, high) in zip(ys, bounds, strict=True)]]
        # each system slightly to the side of the next, so equal accuracies keep every interval in sight
        dodged = [x + step * (i - (len(accuracy) - 1) / 2) for x in xs]
        acc_ax.errorbar(dodged, ys, yerr=errors, color=colour, marker=marker, fillstyle="none", markersize=7,
                        linestyle=style, capsize=3, clip_on=False, label=label + notes.get(label, ""))
        for x, seeds in zip(dodged, per_seed, strict=True):
            if len(seeds) > 1:  # the seeds' own accuracies beside the mean: their spread, next to the items' interval
                acc_ax.scatter([x + step / 2] * len(seeds), seeds, color=colour, marker=".", s=18, alpha=0.8,
                               clip_on=False)
    acc_ax.set_ylim(0, 1)
    kv_ax.set_ylim(bottom=0)  # a saving is read against none
    for ax in (acc_ax, kv_ax):
        ax.margins(x=0.1)
    kv_ax.yaxis.set_major_formatter(FuncFormatter(plain_number))
    label_axes(acc_ax, xlabel="compression (text context tokens / context positions)",
               ylabel="flexible accuracy, mean over seeds (bars: 95% Wilson interval over items; dots: each "
                      "seed; systems offset sideways)",
               title="Accuracy vs compression", legend=False)
    label_axes(kv_ax, xlabel="compression (text context tokens / context positions)",
               ylabel="KV-cache bytes saved per item vs target_text (mean; bars, where seeds differ: min-max)",
               title="KV cache saved vs compression", legend=False)
    handles, labels = acc_ax.get_legend_handles_labels()
    fig.tight_layout()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(3, len(labels)),
               fontsize=8, frameon=False)
    save_figure(fig, run, "accuracy_vs_compression.png")
    return True


def _training_plot(configs: list[str], run: RunDir) -> bool:
    """Bridged accuracy on held-out training items at every evaluation: the mean over seeds, shaded between the
    lowest and highest seed, coloured as every plot of the run colours the configuration."""
    curves = cell_curves(run, configs, "eval", "val_acc")
    if not curves:
        return False
    line_plot(run, "bridged_accuracy_over_training.png", mean_over_seeds(curves),
              styles=config_styles(run.read_study()["configurations"]), integer_x=True, unit_y=True,
              xlabel="optimizer step", ylabel="bridged accuracy, held-out training items (mean over seeds)",
              title="Bridged accuracy over training (stable_*: stability fixes, baseline_*: none)")
    return True


LATENTWIRE = LatentWireStudy()
