"""The three HyLoRADA studies (HYLORADA.md section 8): `hylorada`, `landmarks`, `bucketing`.

One recipe: load the base (a cached tiny model pretrained at a short context, or any HF causal LM),
extend its context (RoPE scaling set before the model is built), apply one HyLoRADA configuration,
fine-tune with the one training loop at the run's `max_length`, and evaluate validation perplexity,
bits per byte, per-decile perplexity, LIM-PPL and retrieval accuracy by depth. The `base` row is the
model before fine-tuning. Configurations are compared paired by seed; a seed fixes the data sample,
its order and the initialisation.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from lmlab.data import generators
from lmlab.data.batching import chunk_examples, tokenize_documents
from lmlab.data.sources import load_documents
from lmlab.engine import distributed as D
from lmlab.engine.train import TrainConfig, collate_lm, train
from lmlab.eval.perplexity import evaluate_perplexity
from lmlab.eval.retrieval import retrieval_accuracy
from lmlab.hylorada import (
    HyLoRADAConfig,
    apply_hylorada,
    auxiliary_loss,
    component_param_counts,
    drop_frozen_boundary_grads,
    learned_boundaries,
    optimizer_rules,
    rope_scaling,
    save_adapter,
)
from lmlab.models.hf import context_length, load_causal_lm, load_config, load_tokenizer, prefix_token_id
from lmlab.models.tiny import PretrainConfig, pretrained_tiny
from lmlab.studies.report import label_axes, line_plot, save_figure
from lmlab.studies.rundir import RunDir
from lmlab.studies.runner import CellOutput, Study, StudyConfig, log_line

# Each configuration: the HyLoRADA fields it sets on top of the study's shared adapter settings.
LORA = {"use_rslora": False, "use_dora": False, "position_bias": False, "landmarks": "none"}
RSLORA = {**LORA, "use_rslora": True}
HYLORADA_CONFIGS: dict[str, dict | None] = {
    "base": None,
    "lora": LORA,
    "rslora": RSLORA,
    "rslora+dora": {**RSLORA, "use_dora": True},
    "rslora+bias": {**RSLORA, "position_bias": True},
    "rslora+landmarks": {**RSLORA, "landmarks": "position_adaptive"},
    "rslora+bias+landmarks": {**RSLORA, "position_bias": True, "landmarks": "position_adaptive"},
    "rslora+bias+learnable_bucket": {**RSLORA, "position_bias": True, "landmarks": "learnable_bucket"},
    "lora+embed+norm": {**LORA, "train_embeddings": True, "train_norms": True},
}
LANDMARK_CONFIGS: dict[str, dict | None] = {
    "rslora": RSLORA,
    "original": {**RSLORA, "landmarks": "original"},
    "position_adaptive": {**RSLORA, "landmarks": "position_adaptive"},
    "per_layer": {**RSLORA, "landmarks": "per_layer"},
}
BUCKETING_CONFIGS: dict[str, dict | None] = {
    "rslora": RSLORA,
    "fixed": {**RSLORA, "landmarks": "position_adaptive"},
    "learnable": {**RSLORA, "landmarks": "learnable_bucket"},
}


class HyloradaStudyConfig(StudyConfig):
    """A HyLoRADA study: base model, data, context, training and the shared adapter settings."""

    ALIASES = {
        "epochs": "train.epochs", "lr": "train.lr", "learning_rate": "train.lr", "batch_size": "train.batch_size",
        "grad_accum": "train.grad_accum", "num_landmarks": "adapter.num_landmarks", "r": "adapter.r",
        "alpha": "adapter.alpha", "num_buckets": "adapter.num_buckets", "boundary_lr": "adapter.boundary_lr",
        "boundary_temperature": "adapter.boundary_temperature", "boundary_diversity": "adapter.boundary_diversity",
        "boundary_freeze_steps": "adapter.boundary_freeze_steps",
    }

    model: str = Field("builtin", description="'builtin' (a cached tiny base) or an HF model dir / hub id")
    base: PretrainConfig = PretrainConfig(num_facts=2)
    dataset: str = Field("builtin", description="'builtin', wikitext-2-raw-v1, pg19, or local files")
    txt_documents: Literal["file", "blank_line"] = "file"
    max_length: int = Field(512, ge=16, description="fine-tuning and evaluation context")
    rope_scaling: Literal["none", "linear", "dynamic", "yarn"] = "linear"
    num_train: int = Field(400, ge=1, description="training examples (windows of max_length)")
    num_val: int = Field(40, ge=1, description="validation documents")
    num_facts: int = Field(6, ge=1, description="built-in documents: facts per document")
    retrieval_docs: int = Field(40, ge=0, description="built-in documents for retrieval by depth (0: skip)")
    eval_batch_size: int = Field(8, ge=1)
    train: TrainConfig = TrainConfig(epochs=1, batch_size=8, lr=1e-3, warmup_ratio=0.05)
    adapter: HyLoRADAConfig = HyLoRADAConfig(dropout=0.0)
    save_adapters: bool = True
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.model == "builtin" and self.max_length < self.base.model.context:
            raise ValueError(f"max_length={self.max_length} is shorter than the tiny base's pretraining context "
                             f"({self.base.model.context}); the study extends the context, it does not shrink it")
        return self


@dataclass
class _Context:
    cfg: HyloradaStudyConfig
    model_path: str
    tokenizer: object
    pretrained_context: int | None
    data: dict = field(default_factory=dict)  # seed -> (train examples, val docs, retrieval docs)


class HyloradaStudy(Study):
    config_cls = HyloradaStudyConfig
    primary_metric = "val_ppl"
    lower_is_better = True

    def __init__(self, name: str, configs: dict[str, dict | None], reference: str, candidate: str):
        self.name = name
        self.configs = configs
        self._reference = reference
        self._candidate = candidate

    def configurations(self, cfg) -> list[str]:
        return list(self.configs)

    def reference(self, cfg) -> str:
        return self._reference

    def candidate(self, cfg) -> str:
        return self._candidate

    def table_metrics(self, cfg) -> list[str]:
        return ["val_ppl", "val_bpb", "lim_ppl", "retrieval_acc", "train_time_s", "peak_mem_mb"]

    def change_metrics(self, cfg) -> list[str]:
        return ["val_ppl", "lim_ppl", "retrieval_acc"]

    # -----------------------------------------------------------------------------------------------

    def prepare(self, cfg: HyloradaStudyConfig, run: RunDir, progress: bool) -> _Context:
        if cfg.model == "builtin":
            path = str(pretrained_tiny(cfg.base, progress=progress, log=log_line))
        else:
            path = cfg.model
        tokenizer = load_tokenizer(path, trust_remote_code=cfg.trust_remote_code)
        pretrained_context = context_length(load_config(path, cfg.trust_remote_code))
        return _Context(cfg, path, tokenizer, pretrained_context)

    def _data(self, ctx: _Context, seed: int):
        if seed in ctx.data:
            return ctx.data[seed]
        ctx.data.clear()  # cells run seed by seed: keep one seed's data
        cfg, tok = ctx.cfg, ctx.tokenizer
        length_fn = partial(_token_count, tok)
        prefix = prefix_token_id(tok)
        budget = cfg.max_length - 8
        if cfg.dataset == "builtin":
            train_docs = [d.text for d in generators.long_documents(seed, cfg.num_train, budget, cfg.num_facts,
                                                                    length_fn)]
            val_docs = [d.text for d in generators.long_documents(seed + 500_000, cfg.num_val, budget, cfg.num_facts,
                                                                  length_fn)]
            examples = chunk_examples(tokenize_documents(train_docs, tok), cfg.max_length, prefix)
        else:
            rng = random.Random(seed)
            all_train = chunk_examples(tokenize_documents(load_documents(cfg.dataset, "train",
                                                                         txt_documents=cfg.txt_documents), tok),
                                       cfg.max_length, prefix)
            examples = rng.sample(all_train, min(cfg.num_train, len(all_train)))
            val_all = load_documents(cfg.dataset, "validation", txt_documents=cfg.txt_documents)
            val_docs = rng.sample(val_all, min(cfg.num_val, len(val_all)))
        retrieval = generators.long_documents(seed + 900_000, cfg.retrieval_docs, budget, cfg.num_facts, length_fn)
        ctx.data[seed] = (examples[: cfg.num_train], val_docs, retrieval)
        return ctx.data[seed]

    def _load_base(self, ctx: _Context):
        cfg = ctx.cfg
        extend = (cfg.rope_scaling != "none" and ctx.pretrained_context is not None
                  and cfg.max_length > ctx.pretrained_context)
        config_fn = partial(rope_scaling, max_length=cfg.max_length, kind=cfg.rope_scaling) if extend else None
        return load_causal_lm(ctx.model_path, config_fn=config_fn, trust_remote_code=cfg.trust_remote_code)

    def run_cell(self, ctx: _Context, config: str, seed: int, cell_dir: Path, progress: bool) -> CellOutput:
        cfg = ctx.cfg
        examples, val_docs, retrieval_docs = self._data(ctx, seed)
        model = self._load_base(ctx)
        settings = self.configs[config]
        details: dict = {}
        params = {"trainable_params": 0, "component_params": 0}
        metrics: dict = {}
        if settings is not None:
            adapter_cfg = cfg.adapter.model_copy(update=settings)
            adapter_cfg = HyLoRADAConfig.model_validate(adapter_cfg.model_dump())
            D.seed_everything(seed)  # the adapter's initialisation depends on the seed
            model = apply_hylorada(model, adapter_cfg, max_positions=cfg.max_length)
            result = train(
                model, examples, cfg.train, seed=seed,
                collate=partial(collate_lm, pad_token_id=ctx.tokenizer.pad_token_id),
                rules=optimizer_rules(adapter_cfg), aux_loss=auxiliary_loss,
                before_step=lambda step, m: drop_frozen_boundary_grads(m, step),
                metrics_path=cell_dir / "metrics.jsonl", progress=progress, desc=f"{config} seed {seed}",
            )
            components = component_param_counts(model)
            params = {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                      "component_params": sum(v for k, v in components.items() if k != "lora")}
            details["components"] = components
            metrics.update(train_time_s=result.train_time_s, peak_mem_mb=result.peak_mem_mb,
                           train_loss=result.final_loss,
                           train_tokens_per_s=result.tokens / max(result.train_time_s, 1e-9))
            if adapter_cfg.landmarks == "learnable_bucket":
                details["boundaries"] = learned_boundaries(model)
            if cfg.save_adapters and D.is_main():
                details["adapter_bytes"] = save_adapter(model, cell_dir / "adapter").get("bytes")
        device = D.device()
        model.to(device)
        ppl = evaluate_perplexity(model, val_docs, ctx.tokenizer, cfg.max_length, batch_size=cfg.eval_batch_size)
        metrics.update(val_ppl=ppl["ppl"], val_bpb=ppl["bpb"], lim_ppl=ppl["lim_ppl"], val_tokens=ppl["tokens"])
        details["decile_ppl"] = ppl["decile_ppl"]
        if retrieval_docs:
            ret = retrieval_accuracy(model, ctx.tokenizer, retrieval_docs, cfg.max_length,
                                     batch_size=2 * cfg.eval_batch_size)
            metrics["retrieval_acc"] = ret["retrieval_acc"]
            details["retrieval_by_depth"] = ret["by_depth"]
            details["retrieval_counts"] = ret["counts"]
        return CellOutput(metrics=metrics, details=details, params=params)

    # -----------------------------------------------------------------------------------------------

    def report_sections(self, summary: dict, rows: list[dict], run: RunDir, record: dict) -> list[str]:
        lines: list[str] = []
        ok = [r for r in rows if r["status"] == "ok"]
        configs = record["configurations"]
        if _decile_plot(ok, configs, run):
            lines += ["## Perplexity by position", "",
                      "Per-decile perplexity over full windows (relative position in the window); LIM-PPL is the "
                      "middle half [0.25, 0.75). See `plots/perplexity_by_decile.png`.", ""]
        depth_lines = _retrieval_table(ok, configs)
        if depth_lines:
            _retrieval_plot(ok, configs, run)
            lines += ["## Retrieval accuracy by depth of the planted fact (mean over seeds)", "", *depth_lines, ""]
            if all(r["metrics"].get("retrieval_acc") == 0 for r in ok if "retrieval_acc" in r["metrics"]):
                lines += ["No configuration retrieved any planted fact: this model does not copy a value from "
                          "earlier in its context at this scale and training budget, before or after fine-tuning, "
                          "so retrieval cannot separate the configurations here; it is meant for pretrained LLMs "
                          "(`--preset paper`).", ""]
        boundary_lines = _boundary_section(ok, run)
        if boundary_lines:
            lines += boundary_lines
        comp = [(r["config"], r["details"].get("components")) for r in ok if r["details"].get("components")]
        if comp:
            seen = {}
            for name, parts in comp:
                seen.setdefault(name, parts)
            keys = sorted({k for parts in seen.values() for k in parts})
            lines += ["## Trainable parameters by component", "",
                      "| configuration | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
            lines += [f"| {n} | " + " | ".join(f"{p.get(k, 0):,}" for k in keys) + " |" for n, p in seen.items()]
            lines.append("")
        return lines


def _token_count(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


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


def _decile_plot(rows, configs, run: RunDir) -> bool:
    curves = _by_config(rows, configs, "decile_ppl")
    if not curves:
        return False
    x = [(d + 0.5) / 10 for d in range(10)]
    line_plot(run, "perplexity_by_decile.png", {c: (x, v) for c, v in curves.items()}, marker="o",
              xlabel="relative position in the window", ylabel="perplexity (mean over seeds)",
              title="Perplexity by position decile", shade=(0.25, 0.75, "LIM region"))
    return True


def _retrieval_table(rows, configs) -> list[str]:
    curves = _by_config(rows, configs, "retrieval_by_depth")
    if not curves:
        return []
    lines = ["| configuration | " + " | ".join(f"{d * 10}-{d * 10 + 10}%" for d in range(10)) + " |",
             "|" + "---|" * 11]
    for c, values in curves.items():
        lines.append(f"| {c} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in values) + " |")
    return lines


def _retrieval_plot(rows, configs, run: RunDir) -> None:
    x = [(d + 0.5) / 10 for d in range(10)]
    curves = _by_config(rows, configs, "retrieval_by_depth")
    line_plot(run, "retrieval_by_depth.png", {c: (x, v) for c, v in curves.items()}, marker="o",
              xlabel="depth of the planted fact in the document", ylabel="retrieval accuracy (mean over seeds)",
              title="Retrieval accuracy by depth", ylim=(-0.02, 1.02))


def _boundary_section(rows, run: RunDir) -> list[str]:
    with_b = [r for r in rows if r["details"].get("boundaries")]
    if not with_b:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["## Learned bucket boundaries (token positions)", "",
             "Each learnable-bucket cell's boundaries after training next to their initial (fixed-scheme) "
             "positions. `moved` is the largest absolute change in tokens.", "",
             "| configuration | seed | initial | learned | moved (max) |", "|---|---|---|---|---|"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plotted_initial = False
    for r in with_b:
        b = r["details"]["boundaries"]
        initial, learned = b["initial"], b["learned"]
        moved = max(abs(a - c) for a, c in zip(initial, learned, strict=True)) if initial else 0.0
        lines.append(f"| {r['config']} | {r['seed']} | {', '.join(f'{v:g}' for v in initial)} | "
                     f"{', '.join(f'{v:.1f}' for v in learned)} | {moved:.2f} |")
        if not plotted_initial:
            ax.plot(range(len(initial)), initial, "k--", marker="x", label="initial (fixed scheme)")
            plotted_initial = True
        ax.plot(range(len(learned)), learned, marker="o", label=f"learned, {r['config']} seed {r['seed']}")
    label_axes(ax, xlabel="boundary index", ylabel="token position", title="Bucket boundaries: initial vs learned")
    save_figure(fig, run, "bucket_boundaries.png")
    lines.append("")
    return lines


HYLORADA = HyloradaStudy("hylorada", HYLORADA_CONFIGS, reference="lora", candidate="rslora+bias+landmarks")
LANDMARKS = HyloradaStudy("landmarks", LANDMARK_CONFIGS, reference="rslora", candidate="position_adaptive")
BUCKETING = HyloradaStudy("bucketing", BUCKETING_CONFIGS, reference="fixed", candidate="learnable")
