"""The MU study (docs/mu.md): the semantic-block transformer against a parameter-matched dense GPT.

Recipe: one tokenizer (byte-level BPE trained on the train split, or an HF tokenizer such as GPT-2's), the
train split packed into windows of `max_seq_len` tokens, and per cell one model trained from scratch with
the one training loop. Every evaluation measures validation perplexity (non-overlapping windows) and
watches for the notes' red flags (plateau, oscillation); every N epochs the model writes generation
samples. The best evaluation's weights are restored and saved as a checkpoint (safetensors + JSON +
tokenizer), which is loaded back: test perplexity and the final samples come from the loaded checkpoint.
Out of memory fails the cell with the smaller `max_seq_len` / batch to try.

Configurations: `mu-sota`, `mu-simple` and the reference `dense`, whose width is solved so that its
parameter count matches mu-sota's (total or non-embedding, tied or untied). A seed fixes initialisation,
data order and dropout; the data and the tokenizer are the same for every cell, so cells pair by seed.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from lmlab.config import Section
from lmlab.data import generators
from lmlab.data.batching import packed_examples, tokenize_documents
from lmlab.data.sources import load_documents
from lmlab.data.tokenizer import train_bpe_tokenizer
from lmlab.engine import distributed as D
from lmlab.engine.hooks import Display, Hooks
from lmlab.engine.train import TrainConfig, steps_per_epoch, train
from lmlab.errors import DataError, is_out_of_memory
from lmlab.eval.perplexity import evaluate_perplexity
from lmlab.eval.sampling import sample
from lmlab.models.hf import load_tokenizer, prefix_token_id
from lmlab.mu import (
    DenseConfig,
    DenseModel,
    MUConfig,
    MUModel,
    count_parameters,
    load_checkpoint,
    match_dense,
    save_checkpoint,
)
from lmlab.mu.config import PRESETS
from lmlab.mu.matching import model_parameter_counts
from lmlab.studies import lr_search
from lmlab.studies.attribution import effect_text
from lmlab.studies.report import (
    cell_curves,
    change_cell,
    config_styles,
    fmt,
    interval_text,
    label_axes,
    line_plot,
    mean_over_seeds,
    mean_text,
    save_figure,
    second_half_start,
    seed_curves,
)
from lmlab.studies.rundir import TRAIN_STATE, RunDir
from lmlab.studies.runner import CellOutput, Study, StudyConfig, log_line
from lmlab.studies.setting import describe_data, plural

CONFIGURATIONS = ("mu-sota", "mu-simple", "dense")
REFERENCE, CANDIDATE = "dense", "mu-sota"
MATCHED_TO = "mu-sota"  # the dense baseline's parameter budget
CHECKPOINT_DIR = "checkpoint"
SAMPLES_FILE = "eval_samples.jsonl"


LR_CHOSEN = "chosen per model"  # the Setting's learning rate under an lr search


class MUShape(Section):
    """Fields set on top of an MU preset (`mu-sota`, `mu-simple`); unset fields keep the preset's value."""

    grid: int | None = Field(None, ge=1)
    block_shape: tuple[int, int] | None = None
    n_layers: int | None = Field(None, ge=1)
    cross_heads: int | None = Field(None, ge=1)
    ffn_mult: int | None = Field(None, ge=1)
    affinity: Literal["low_rank", "hashed"] | None = None
    affinity_rank: int | None = Field(None, ge=1)
    affinity_buckets: int | None = Field(None, ge=1)
    gate_hidden: int | None = Field(None, ge=1)


class MatchConfig(Section):
    """How the dense baseline is matched to mu-sota's parameter count (docs/mu.md section 2)."""

    count: Literal["total", "non_embedding"] = "total"
    tie_embeddings: bool | None = Field(None, description="the dense model's tying; None: as MU's")
    tolerance: float = Field(0.02, gt=0.0, lt=1.0, description="largest relative difference of the counts")


class MonitorConfig(Section):
    """The notes' red flags, checked at every evaluation of validation perplexity."""

    patience: int = Field(3, ge=1, description="plateau: evaluations without a new best validation perplexity")
    min_delta: float = Field(0.0, ge=0.0, lt=1.0, description="relative improvement that counts as a new best")
    rising: int = Field(3, ge=1, description="oscillation: consecutive evaluations whose validation loss rose")


class GenerationConfig(Section):
    """Generation samples every `every_epochs` epochs and from the best checkpoint (docs/mu.md section 3)."""

    every_epochs: int = Field(1, ge=1)
    prompts: list[str] = Field(default_factory=lambda: ["the old"], min_length=1)
    max_new_tokens: int = Field(40, ge=1)
    temperature: float = Field(0.8, ge=0.0, description="0: greedy")
    top_k: int = Field(40, ge=0, description="0: no top-k filtering")
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.2, ge=1.0, description="CTRL penalty: divides positive, multiplies negative")


class MUStudyConfig(StudyConfig):
    """The MU study: data, tokenizer, the three models, training, monitoring, samples and the ppl bands."""

    # The notes' flag names (their `config.py` and action plan) -> fields.
    ALIASES = {
        "epochs": "train.epochs", "num_epochs": "train.epochs", "lr": "train.lr", "learning_rate": "train.lr",
        "batch_size": "train.batch_size", "grad_accum": "train.grad_accum",
        "gradient_accumulation": "train.grad_accum", "warmup_steps": "train.warmup_steps",
        "eval_every": "train.eval_every", "patience": "monitor.patience", "count": "match.count",
        "temperature": "generation.temperature", "top_k": "generation.top_k", "top_p": "generation.top_p",
        "repetition_penalty": "generation.repetition_penalty", "samples_every": "generation.every_epochs",
    }

    dataset: str = Field("builtin", description="'builtin', wikitext-2-raw-v1, wikitext-103-raw-v1 or local files")
    txt_documents: Literal["file", "blank_line"] = "file"
    data_seed: int = Field(0, description="built-in corpus: the seed of the generated documents (same for all cells)")
    num_train_docs: int = Field(300, ge=1, description="built-in corpus: training documents")
    num_val_docs: int = Field(30, ge=1, description="built-in corpus: validation documents")
    num_test_docs: int = Field(30, ge=1, description="built-in corpus: test documents")
    sentences_per_doc: int = Field(40, ge=1, description="built-in corpus: sentences per document")
    tokenizer: str = Field("bpe", description="'bpe' (trained on the train split), or the tokenizer of an HF model "
                                              "(hub id such as gpt2, or a save_pretrained directory)")
    vocab_size: int = Field(512, ge=16, description="size of the BPE vocabulary (tokenizer='bpe' only)")
    max_seq_len: int = Field(128, ge=8, description="training windows and evaluation context")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    tie_embeddings: bool = True
    mu_sota: MUShape = MUShape()
    mu_simple: MUShape = MUShape()
    match: MatchConfig = MatchConfig()
    train: TrainConfig = TrainConfig(epochs=2, batch_size=16, lr=2e-3, warmup_ratio=0.05)
    lr_grid: list[float] | None = Field(None, min_length=2, description="choose each model's learning rate from "
                                        "these by validation perplexity on a tuning seed before the seeds run")
    tuning_seed: int | list[int] = Field(7, description="initialisation and data-order seed(s) of the learning-rate "
                                         "search; several: the geometric mean of their validation perplexities")
    eval_batch_size: int = Field(16, ge=1)
    monitor: MonitorConfig = MonitorConfig()
    generation: GenerationConfig = GenerationConfig()
    success_ppl: float = Field(200.0, gt=0, description="perplexity band: below is success (the notes' < 200)")
    partial_ppl: float = Field(300.0, gt=0, description="perplexity band: up to this is partial, above is failure")
    band_metric: Literal["val_ppl", "test_ppl"] = Field(
        "test_ppl", description="the bands' metric: test perplexity of the checkpoint selected on validation")

    @field_validator("mu_sota", "mu_simple")
    @classmethod
    def _check_shape(cls, shape: MUShape, info: ValidationInfo) -> MUShape:
        preset = info.field_name.replace("_", "-")
        try:  # the layout rules (tiling, heads) do not depend on the vocabulary or the context
            MUConfig.model_validate({**PRESETS[preset], "vocab_size": 1, "max_seq_len": 1,
                                     **shape.model_dump(exclude_none=True)})
        except ValidationError as exc:
            raise ValueError(f"{preset}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None
        return shape

    @model_validator(mode="after")
    def _check_grid(self):
        lr_search.check_grid(self.lr_grid, self.tuning_seed, self.seeds)
        return self

    @field_validator("partial_ppl")
    @classmethod
    def _check_bands(cls, partial_ppl: float, info: ValidationInfo) -> float:
        success_ppl = info.data.get("success_ppl")
        if success_ppl is not None and partial_ppl < success_ppl:
            raise ValueError(f"must be >= success_ppl ({success_ppl:g}): success < success_ppl <= partial <= "
                             f"partial_ppl < failure")
        return partial_ppl


def mu_config(cfg: MUStudyConfig, name: str, vocab_size: int) -> MUConfig:
    """The MU preset `name` with the study's vocabulary, context, dropout, tying and shape overrides."""
    shape = (cfg.mu_sota if name == "mu-sota" else cfg.mu_simple).model_dump(exclude_none=True)
    return MUConfig.preset(name, vocab_size=vocab_size, max_seq_len=cfg.max_seq_len, dropout=cfg.dropout,
                           tie_embeddings=cfg.tie_embeddings, **shape)


def model_configs(cfg: MUStudyConfig, vocab_size: int) -> dict[str, MUConfig | DenseConfig]:
    """The three configurations; the dense baseline is matched to mu-sota by `cfg.match`."""
    configs: dict[str, MUConfig | DenseConfig] = {name: mu_config(cfg, name, vocab_size) for name in ("mu-sota",
                                                                                                       "mu-simple")}
    configs["dense"] = match_dense(configs[MATCHED_TO], count=cfg.match.count,
                                   tie_embeddings=cfg.match.tie_embeddings, tolerance=cfg.match.tolerance)
    return configs


def build_model(config: MUConfig | DenseConfig) -> MUModel | DenseModel:
    return MUModel(config) if isinstance(config, MUConfig) else DenseModel(config)


# ---------------------------------------------------------------------------------------------------
# Monitoring: the notes' red flags


class RedFlagMonitor:
    """Watches the sequence of validation perplexities for the notes' red flags.

    - plateau: no new best (by more than `min_delta`, relative) for `patience` evaluations in a row; raised
      once per plateau (again only after a new best). The notes: the learning rate is still too high.
    - oscillation: the validation loss rose on `rising` consecutive evaluations; raised once per run of
      rises. The notes: reduce the learning rate (5e-5 for their 1e-4).
    """

    def __init__(self, config: MonitorConfig, lr: float):
        self.config = config
        self.lr = lr
        self.best: float | None = None
        self.best_step: int | None = None
        self.since_best = 0
        self.previous_loss: float | None = None
        self.rises = 0
        self.flags: list[dict] = []

    def update(self, step: int, epoch: float, ppl: float) -> list[dict]:
        """Record one evaluation; returns the flags it raised (also kept in `self.flags`)."""
        raised = []
        loss = math.log(ppl) if ppl > 0 and math.isfinite(ppl) else math.inf
        if self.best is None or ppl < self.best * (1.0 - self.config.min_delta):
            self.best, self.best_step, self.since_best = ppl, step, 0
        else:
            self.since_best += 1
            if self.since_best == self.config.patience:
                raised.append(self._flag("plateau", step, epoch, (
                    f"validation perplexity has not improved for {self.since_best} evaluations (best "
                    f"{self.best:.4g} at step {self.best_step}); the notes: the learning rate is still too high - "
                    f"try lr={self.lr / 2:.3g}")))
        self.rises = self.rises + 1 if self.previous_loss is not None and loss > self.previous_loss else 0
        self.previous_loss = loss
        if self.rises == self.config.rising:
            raised.append(self._flag("oscillation", step, epoch, (
                f"validation loss rose on {self.rises} consecutive evaluations (now {loss:.4f}); the notes: "
                f"reduce the learning rate - try lr={self.lr / 2:.3g}")))
        self.flags += raised
        return raised

    @staticmethod
    def _flag(kind: str, step: int, epoch: float, message: str) -> dict:
        return {"flag": kind, "step": step, "epoch": round(epoch, 3), "message": message}


class OutOfMemory(RuntimeError):
    """A cell ran out of memory; the message names a smaller `max_seq_len` and batch to try."""


def smaller_settings(max_seq_len: int, batch_size: int, grad_accum: int) -> dict[str, int]:
    """What to try after running out of memory: a ~5/6 shorter context rounded down to a multiple of 16
    (the notes' 192 -> 160), and half the micro-batch with twice the accumulation (same effective batch)."""
    advice = {"max_seq_len": max(8, int(max_seq_len * 5 / 6) // 16 * 16)}
    if batch_size > 1:
        advice.update(batch_size=batch_size // 2, grad_accum=grad_accum * 2)
    return advice


@contextlib.contextmanager
def out_of_memory_advice(what: str, max_seq_len: int, batch_size: int, grad_accum: int):
    """Turn an out-of-memory error (CUDA, CPU allocator, Python) inside the block into `OutOfMemory`."""
    try:
        yield
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        advice = smaller_settings(max_seq_len, batch_size, grad_accum)
        hint = f"max_seq_len={advice['max_seq_len']}"
        if "batch_size" in advice:
            hint += f", or batch_size={advice['batch_size']} grad_accum={advice['grad_accum']} (same effective batch)"
        raise OutOfMemory(f"out of memory while {what} at max_seq_len={max_seq_len}, batch_size={batch_size}; "
                          f"try {hint}") from None


def ppl_band(ppl: float | None, success_ppl: float, partial_ppl: float) -> str:
    """The notes' bands: success below `success_ppl`, partial up to `partial_ppl`, failure above."""
    if ppl is None or not math.isfinite(ppl):
        return "failure"
    if ppl < success_ppl:
        return "success"
    return "partial" if ppl <= partial_ppl else "failure"


# ---------------------------------------------------------------------------------------------------
# The recipe


@dataclass
class _Context:
    cfg: MUStudyConfig
    tokenizer: object
    prefix_id: int
    examples: list[dict]
    val_docs: list[str]
    test_docs: list[str]
    models: dict[str, MUConfig | DenseConfig]
    lrs: dict[str, float] = field(default_factory=dict)  # each model's chosen learning rate (`lr_grid`)

    def train_config(self, config: str) -> TrainConfig:
        """The training settings of `config`'s cells: the study's, at the model's chosen learning rate."""
        return self.cfg.train.model_copy(update={"lr": self.lrs.get(config, self.cfg.train.lr)})


def documents(cfg: MUStudyConfig) -> tuple[list[str], list[str], list[str]]:
    """(train, validation, test) documents: the built-in corpus (three disjoint seeds) or `load_documents`."""
    if cfg.dataset == "builtin":
        seed, per_doc = cfg.data_seed, cfg.sentences_per_doc
        return (generators.corpus_documents(seed, cfg.num_train_docs, per_doc),
                generators.corpus_documents(seed + 1_000_003, cfg.num_val_docs, per_doc),
                generators.corpus_documents(seed + 2_000_006, cfg.num_test_docs, per_doc))
    splits = [load_documents(cfg.dataset, split, txt_documents=cfg.txt_documents)
              for split in ("train", "validation", "test")]
    return splits[0], splits[1], splits[2]


def _tokenizer(cfg: MUStudyConfig, train_docs: list[str]):
    if cfg.tokenizer == "bpe":
        return train_bpe_tokenizer(train_docs, cfg.vocab_size)
    return load_tokenizer(cfg.tokenizer)


def generate_samples(model: MUModel | DenseModel, tokenizer, prefix_id: int, gen_cfg: GenerationConfig,
                     seed: int) -> list[dict]:
    """`{"prompt", "text"}` per prompt: the prompt after the document-start token, continued with the
    configured sampling settings until `max_new_tokens` or a new document starts (seeded: reproducible)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    out = []
    for prompt in gen_cfg.prompts:
        ids = [prefix_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
        new = sample(model, torch.tensor([ids], device=device), gen_cfg.max_new_tokens,
                     temperature=gen_cfg.temperature, top_k=gen_cfg.top_k, top_p=gen_cfg.top_p,
                     repetition_penalty=gen_cfg.repetition_penalty, generator=generator, eos_token_id=prefix_id)
        out.append({"prompt": prompt, "text": tokenizer.decode(new[0].tolist(), skip_special_tokens=True)})
    return out


def _append_jsonl(path: Path, records: list[dict]) -> None:
    if D.is_main():
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)


class _CellHooks(Hooks):
    """MU's part of the training loop for one cell: at every evaluation, validation perplexity, bits per byte and
    accuracy, the red flags, and a set of samples at the first evaluation after every N epochs; the best evaluation
    (by validation perplexity) is restored at the end. Its state (the monitor, the sampling block, the samples
    file's length) goes into every checkpoint."""

    select, restore_best = "val_ppl", True
    MONITOR_KEYS = ("best", "best_step", "since_best", "previous_loss", "rises", "flags")

    def __init__(self, ctx: _Context, cell: str, seed: int, samples_path: Path, lr: float):
        self.ctx, self.cell, self.seed, self.samples_path = ctx, cell, seed, samples_path
        self.monitor = RedFlagMonitor(ctx.cfg.monitor, lr)
        self.per_epoch = steps_per_epoch(len(ctx.examples), ctx.cfg.train)
        self.sampled_block = 0  # epochs // every_epochs at the last periodic samples

    def evaluate(self, state) -> dict:
        ctx, cfg, model = self.ctx, self.ctx.cfg, state.model
        epoch = state.step / self.per_epoch
        val = evaluate_perplexity(model, ctx.val_docs, ctx.tokenizer, cfg.max_seq_len,
                                  batch_size=cfg.eval_batch_size, positional=False, prefix_id=ctx.prefix_id)
        result = {"epoch": epoch, "val_ppl": val["ppl"], "val_loss": math.log(val["ppl"]), "val_bpb": val["bpb"],
                  "accuracy": val["accuracy"]}
        flags = self.monitor.update(state.step, epoch, val["ppl"])
        for flag in flags:
            log_line(f"red flag ({self.cell}, step {state.step}): {flag['flag']} - {flag['message']}")
        if flags:
            result["red_flags"] = [f["flag"] for f in flags]
        block = int(epoch + 1e-9) // cfg.generation.every_epochs
        if block > self.sampled_block:
            self.sampled_block = block
            samples = generate_samples(model, ctx.tokenizer, ctx.prefix_id, cfg.generation, self.seed)
            _append_jsonl(self.samples_path, [{"kind": "periodic", "step": state.step, "epoch": round(epoch, 3),
                                               **s} for s in samples])
        return result

    def state_dict(self) -> dict:
        size = self.samples_path.stat().st_size if self.samples_path.exists() else 0
        return {"monitor": {k: getattr(self.monitor, k) for k in self.MONITOR_KEYS},
                "sampled_block": self.sampled_block, "samples_bytes": size}

    def load_state_dict(self, values: dict) -> None:
        for k in self.MONITOR_KEYS:
            setattr(self.monitor, k, values["monitor"][k])
        self.sampled_block = values["sampled_block"]
        self.samples_bytes = values["samples_bytes"]

    def begin(self, state, resumed: bool) -> None:
        # samples written after the checkpoint (or by an attempt that starts over) go: this run writes them again
        if D.is_main() and self.samples_path.exists():
            with open(self.samples_path, "r+b") as f:
                f.truncate(self.samples_bytes if resumed else 0)


class MUStudy(Study):
    name = "mu"
    config_cls = MUStudyConfig
    # Decide on test perplexity: the checkpoint is *selected* by validation perplexity, so its validation value is
    # optimistic; its test perplexity is not.
    primary_metric = "test_ppl"
    lower_is_better = True

    def configurations(self, cfg) -> list[str]:
        return list(CONFIGURATIONS)

    def reference(self, cfg) -> str:
        return REFERENCE

    def candidate(self, cfg) -> str:
        return CANDIDATE

    def comparisons(self, cfg) -> list[dict]:
        # mu-simple simplifies mu-sota (fewer layers, larger blocks): it is judged against mu-sota, one change at a
        # time; against the dense baseline (matched to mu-sota, not to it) it differs in architecture and size
        return [{"component": "the MU architecture (mu-sota) vs the matched dense baseline", "candidate": CANDIDATE,
                 "parent": REFERENCE, "headline": True},
                {"component": "mu-simple's simplification of mu-sota", "candidate": "mu-simple", "parent": CANDIDATE}]

    def setting(self, cfg) -> list[str]:
        data = describe_data(cfg.dataset, f"the built-in corpus ({cfg.num_train_docs} training, {cfg.num_val_docs} "
                                          f"validation and {cfg.num_test_docs} test documents of "
                                          f"{cfg.sentences_per_doc} sentences)")
        tokenizer = (f"a BPE tokenizer of {cfg.vocab_size} tokens trained on the training split" if cfg.tokenizer ==
                     "bpe" else f"the tokenizer of `{cfg.tokenizer}`")
        shapes = []
        for name in ("mu-sota", "mu-simple"):
            m = mu_config(cfg, name, cfg.vocab_size)
            shapes.append(f"{name} ({plural(m.n_layers, 'layer')}, a state of {m.grid} x {m.grid} in blocks of "
                          f"{m.block_shape[0]} x {m.block_shape[1]})")
        lines = [f"Data: {data}, {tokenizer}, packed windows of {cfg.max_seq_len} tokens.",
                 f"Models, trained from scratch: {shapes[0]}, {shapes[1]} and a dense transformer whose "
                 f"{cfg.match.count.replace('_', '-')} parameter count is matched to mu-sota's within "
                 f"{cfg.match.tolerance:.0%} (sizes under Models side by side).",
                 f"Training: {cfg.train.describe(lr=LR_CHOSEN if cfg.lr_grid else None)}; the checkpoint of best "
                 "validation perplexity is kept, and test "
                 "perplexity is measured on it, loaded back.",
                 f"Seeds: {len(cfg.seeds)} ({', '.join(map(str, cfg.seeds))}), the same data order for every model of "
                 "a seed (paired)."]
        if cfg.lr_grid:
            tuning = lr_search.tuning_seeds(cfg.tuning_seed)
            lines.insert(3, f"Learning rate: each model's chosen from {', '.join(f'{v:g}' for v in cfg.lr_grid)} on "
                            f"tuning seed{'s' if len(tuning) > 1 else ''} {', '.join(map(str, tuning))} (see Learning "
                            "rate).")
        return lines

    def table_metrics(self, cfg) -> list[str]:
        return ["test_ppl", "val_ppl", "test_accuracy", "val_bpb", "tokens_per_s", "train_time_s"]

    def change_metrics(self, cfg) -> list[str]:
        return ["test_ppl", "val_ppl", "test_accuracy", "tokens_per_s"]

    def prepare(self, cfg: MUStudyConfig, run: RunDir, display: Display) -> _Context:
        train_docs, val_docs, test_docs = documents(cfg)
        tokenizer = _tokenizer(cfg, train_docs)
        prefix = prefix_token_id(tokenizer)
        # Packed fixed-length windows: no padding, so the models never need an attention mask.
        examples = packed_examples(tokenize_documents(train_docs, tokenizer), cfg.max_seq_len, prefix)
        if not examples:
            raise DataError(f"the train split of {cfg.dataset} has fewer tokens than max_seq_len={cfg.max_seq_len}; "
                            f"give more training text or a smaller max_seq_len")
        models = model_configs(cfg, len(tokenizer))
        counts = {name: model_parameter_counts(c) for name, c in models.items()}
        display.line(f"mu: {len(examples)} training windows of {cfg.max_seq_len} tokens, vocabulary {len(tokenizer)}, "
                 f"{len(val_docs)} validation / {len(test_docs)} test documents; parameters (total / non-embedding): "
                 + ", ".join(f"{n} {c['total']:,} / {c['non_embedding']:,}" for n, c in counts.items()))
        ctx = _Context(cfg, tokenizer, prefix, examples, val_docs, test_docs, models)
        if cfg.lr_grid is not None:
            ctx.lrs = self._search_learning_rates(ctx, run, display)
        return ctx

    def _search_learning_rates(self, ctx: _Context, run: RunDir, display: Display) -> dict[str, float]:
        """Each model's learning rate from `lr_grid`: the best validation perplexity of one run on the tuning seed
        (its own initialisation and data order; the decision is on the test split). `lr_search.search` saves it
        as it goes; each run's curve and samples go to `lr_search/<config>/lr-<lr>/`."""
        cfg = ctx.cfg

        several = len(lr_search.tuning_seeds(cfg.tuning_seed)) > 1

        def score(config: str, lr: float, chosen: dict[str, float], seed: int) -> float:
            where = run.root / "lr_search" / config / f"lr-{lr:g}"
            if several:  # one directory per tuning seed
                where = where / f"seed-{seed}"
            where.mkdir(parents=True, exist_ok=True)
            D.seed_everything(seed)
            model = build_model(ctx.models[config])
            hooks = _CellHooks(ctx, f"lr search {config} lr {lr:g} seed {seed}", seed, where / SAMPLES_FILE, lr)
            result = train(model, ctx.examples, cfg.train.model_copy(update={"lr": lr}), seed=seed,
                           hooks=hooks, metrics_path=where / "metrics.jsonl",
                           display=display.named(f"lr search {config} lr {lr:g} seed {seed}"))
            return result.best["val_ppl"]

        return lr_search.search(run.root, cfg.lr_grid, cfg.tuning_seed, run.read_study()["configurations"], score,
                                display)

    def run_cell(self, ctx: _Context, config: str, seed: int, cell_dir: Path, display: Display) -> CellOutput:
        cfg = ctx.cfg
        with out_of_memory_advice(f"training {config}", cfg.max_seq_len, cfg.train.batch_size, cfg.train.grad_accum):
            return self._run_cell(ctx, config, seed, cell_dir, display)

    def _run_cell(self, ctx: _Context, config: str, seed: int, cell_dir: Path, display: Display) -> CellOutput:
        cfg = ctx.cfg
        D.seed_everything(seed)  # the initialisation depends on the seed
        model = build_model(ctx.models[config])
        counts = count_parameters(model)
        samples_path = cell_dir / SAMPLES_FILE
        train_cfg = ctx.train_config(config)
        hooks = _CellHooks(ctx, f"{config} seed {seed}", seed, samples_path, train_cfg.lr)
        result = train(model, ctx.examples, train_cfg, seed=seed, hooks=hooks, checkpoint_dir=cell_dir / TRAIN_STATE,
                       metrics_path=cell_dir / "metrics.jsonl",
                       display=display)
        best = result.best
        # The best weights (restored by train) go to disk; the checkpoint loaded back is what test
        # perplexity and the final samples are measured on.
        checkpoint = cell_dir / CHECKPOINT_DIR
        if D.is_main():
            save_checkpoint(model, checkpoint, tokenizer=ctx.tokenizer,
                            extra={"config": config, "seed": seed, "step": best["step"], "epoch": best["epoch"],
                                   "val_ppl": best["val_ppl"]})
        D.barrier()
        loaded, _, _ = load_checkpoint(checkpoint)
        loaded.to(D.device())
        test = evaluate_perplexity(loaded, ctx.test_docs, ctx.tokenizer, cfg.max_seq_len,
                                   batch_size=cfg.eval_batch_size, positional=False, prefix_id=ctx.prefix_id)
        final_samples = generate_samples(loaded, ctx.tokenizer, ctx.prefix_id, cfg.generation, seed)
        _append_jsonl(samples_path, [{"kind": "best_checkpoint", "step": best["step"], "epoch": round(best["epoch"], 3),
                                      **s} for s in final_samples])
        metrics = {
            "val_ppl": best["val_ppl"], "test_ppl": test["ppl"], "accuracy": best["accuracy"],
            "val_bpb": best["val_bpb"], "test_bpb": test["bpb"], "test_accuracy": test["accuracy"],
            "tokens_per_s": result.tokens / max(result.train_time_s, 1e-9),
            "params_total": counts["total"], "params_non_embedding": counts["non_embedding"],
            "train_time_s": result.train_time_s, "peak_mem_mb": result.peak_mem_mb, "train_loss": result.final_loss,
            "best_step": best["step"], "red_flags": len(hooks.monitor.flags),
        }
        details = {
            "model": {"kind": "mu" if isinstance(model, MUModel) else "dense",
                      "config": model.config.model_dump(mode="json")},
            "red_flags": hooks.monitor.flags,
            "samples": final_samples,
            "checkpoint": str(checkpoint.relative_to(cell_dir.parents[2])),
            "steps": result.steps,
            "stopped_early": result.stopped_early,
            "lr": train_cfg.lr,
            "ppl_band": ppl_band(metrics[cfg.band_metric], cfg.success_ppl, cfg.partial_ppl),
        }
        return CellOutput(metrics=metrics, details=details, params={"trainable_params": counts["total"]})

    # -----------------------------------------------------------------------------------------------

    def extra_summary(self, summary: dict, rows: list[dict], run: RunDir, record: dict) -> dict:
        gap = curve_gap(run, rows, CANDIDATE, REFERENCE)
        late = late_change(run, rows, record["configurations"])
        decision = summary.get("decision") or {}
        return {"claims": mu_claims(record["config"], summary, rows, gap, late), "validation_gap": gap,
                "late_change": late, "comparisons": _with_rates(summary["comparisons"], record["config"], rows),
                **({"decision": _with_rates([decision], record["config"], rows)[0]}
                   if decision.get("candidate") and decision.get("text") else {})}

    def report_sections(self, summary: dict, rows: list[dict], run: RunDir, record: dict) -> list[str]:
        cfg = record["config"]
        ok = [r for r in rows if r["status"] == "ok"]
        configs = record["configurations"]
        lines = _side_by_side(summary, ok, configs, cfg, summary.get("late_change"))
        lines += _bands(summary, ok, configs, cfg)
        lines += _learning_rate_section(run, ok, configs, cfg)
        if _validation_curves_plot(run, configs):
            lines += ["## Validation perplexity during training", "",
                      "Mean over seeds at each evaluation (MU vs the dense baseline): "
                      "`plots/validation_curves.png`.", ""]
            if _validation_gap_plot(run, summary.get("validation_gap"), configs):
                lines += ["The gap paired by seed at each evaluation, with its 95% interval: "
                          "`plots/validation_gap.png`.", ""]
            lines += _gap_lines(summary.get("validation_gap"))
        lines += _red_flags(rows)
        lines += _samples(ok, configs, cfg)
        return lines


# ---------------------------------------------------------------------------------------------------
# The notes' claims (docs/studies.md, claims of the research notes: M1-M3)

NOTES_SETTING = "12 layers, ~16.7M parameters, WikiText-2, 128 tokens"
NOTES_RECIPE_SETTING = "12 layers, ~16.7M parameters, WikiText-2, 192 tokens"  # M2: the recipe's own length


def _notes_scale(cfg: dict) -> str | None:
    """None when the run is at the notes' scale (WikiText-2, mu-sota 12 layers), else what differs."""
    differs = []
    if not str(cfg["dataset"]).startswith("wikitext-2"):
        data = ("lmlab's built-in generated text" if cfg["dataset"] == "builtin" else f"`{cfg['dataset']}`")
        differs.append(f"data: {data}, not WikiText-2")
    layers = (cfg.get("mu_sota") or {}).get("n_layers") or PRESETS["mu-sota"]["n_layers"]
    if layers != PRESETS["mu-sota"]["n_layers"]:
        differs.append(f"mu-sota: {layers} layers, not {PRESETS['mu-sota']['n_layers']}")
    return "; ".join(differs) or None


def _setting(notes: str, cfg: dict, summary: dict, tokens: int) -> str:
    """A claim's setting: the notes' (at `tokens` per sequence), and what this run does differently (data, depth,
    size, sequence length)."""
    differs = [_notes_scale(cfg)] if _notes_scale(cfg) else []
    params = summary["configs"].get(CANDIDATE, {}).get("trainable_params")
    if params and abs(params - 16.7e6) > 0.1 * 16.7e6:
        differs.append(f"{params:,} parameters, not ~16.7M")
    if cfg.get("max_seq_len") and cfg["max_seq_len"] != tokens:
        differs.append(f"{cfg['max_seq_len']} tokens, not {tokens}")
    return notes + (f"; this run differs - {'; '.join(differs)}" if differs else "")


def mu_claims(cfg: dict, summary: dict, rows: list[dict], gap: dict | None = None,
              late: dict | None = None) -> list[dict]:
    """M1-M3 against this run. Absolute perplexities (M1, M2) are judged only at the notes' scale (WikiText-2 and
    their depth); the architecture question (M3) is the matched comparison, judged at any scale, and where the models
    were still improving at the end (`late`, from `late_change`) its verdict says how the gap moved over training
    (`gap`, from `curve_gap`)."""
    sota = summary["configs"].get(CANDIDATE, {}).get("metrics", {})
    test = sota.get("test_ppl")
    scale = _notes_scale(cfg)
    flags = [f for r in rows if r["config"] == CANDIDATE and r["status"] == "ok"
             for f in r["details"].get("red_flags", []) if f["flag"] == "plateau"]
    cells = sum(r["config"] == CANDIDATE and r["status"] == "ok" for r in rows)
    epochs = cfg["train"]["epochs"]
    plateau = (f"; plateau flagged in {plural(len({f['step'] for f in flags}), 'evaluation')} over "
               f"{plural(cells, 'cell')}"
               if epochs > 6 else f"; a plateau after epoch 6 is not observable (the run ends at epoch {epochs:g})")
    claims = []
    m1 = {"id": "M1", "claim": "MU-SOTA reached PPL 402.17 and 17.25% accuracy after 10 epochs, plateauing after "
                              "epoch 6", "setting": _setting(NOTES_SETTING, cfg, summary, 128)}
    if not test:
        claims.append({**m1, "measured": "not run", "verdict": f"not testable here: `{CANDIDATE}` did not run"})
    else:
        acc = sota.get("test_accuracy", {}).get("mean")
        interval = f" {interval_text(*test['ci95'])}" if test.get("ci95") else ""
        measured = (f"`{CANDIDATE}` test_ppl {mean_text(test)}{interval}" +
                    (f", test accuracy {acc:.2%}" if acc is not None else "") +
                    plateau)
        if scale:
            verdict = f"not testable at this scale ({scale}): an absolute perplexity depends on the data and size"
        elif test.get("ci95"):
            inside = test["ci95"][0] <= 402.17 <= test["ci95"][1]
            verdict = ("supported: 402.17 lies inside the 95% interval" if inside else
                       "not supported: 402.17 lies outside the 95% interval")
        else:
            verdict = "not testable here: one seed gives no interval"
        claims.append({**m1, "measured": measured, "verdict": verdict})
    m2 = {"id": "M2", "claim": "with lr 1e-4, warmup 2000, 30 epochs and 192 tokens MU-SOTA reaches PPL < 200",
          "setting": _setting(NOTES_RECIPE_SETTING, cfg, summary, 192)}
    recipe = cfg["train"]["lr"] == 1e-4 and cfg["train"]["epochs"] >= 30 and cfg["max_seq_len"] == 192
    if not test:
        claims.append({**m2, "measured": "not run", "verdict": f"not testable here: `{CANDIDATE}` did not run"})
    elif scale or not recipe:
        claims.append({**m2, "measured": f"this run: lr {_rates_text(cfg, rows)}, {plural(epochs, 'epoch')}, "
                                         f"{cfg['max_seq_len']} tokens, {scale or 'WikiText-2'}",
                       "verdict": "not testable at this scale: the run does not use the notes' recipe and data "
                                  "(the `paper` preset does)"})
    else:
        hi = (test.get("ci95") or [test["mean"]] * 2)[1]
        lo = (test.get("ci95") or [test["mean"]] * 2)[0]
        verdict = ("supported: the interval lies below 200" if hi < 200 else
                   "not supported: the interval lies above 200" if lo >= 200 else
                   "not testable at this scale: the interval holds 200")
        claims.append({**m2, "measured": f"`{CANDIDATE}` test_ppl {fmt(test['mean'])}", "verdict": verdict})
    comparison = next((c for c in summary["comparisons"] if c["candidate"] == CANDIDATE and
                       c["parent"] == REFERENCE), None)
    m3 = {"id": "M3", "claim": "MU helps: it beats the parameter-matched dense baseline (the notes' test: baseline "
                              "PPL > 402 means MU helps)",
          "setting": "dense d_model 208 for ~16.7M parameters"}
    if comparison is None or not comparison["n"]:
        claims.append({**m3, "measured": "not run", "verdict": "not testable here: mu-sota or dense did not run"})
    else:
        measured = f"`{CANDIDATE}` vs `{REFERENCE}` on test_ppl: {effect_text(comparison)}"
        lo, hi = comparison["ci95"] or (None, None)  # no interval: not testable (below)
        budget = f"after {plural(epochs, 'epoch')} {learning_rate_clause(cfg, rows, (CANDIDATE, REFERENCE))}"
        at_last = best_at_last(rows, (CANDIDATE, REFERENCE))
        words, falling = late_words(late, (CANDIDATE, REFERENCE), cfg["train"])
        if at_last and falling:
            budget += (f". Every cell of `{CANDIDATE}` and `{REFERENCE}` had its best at its last evaluation "
                       f"({at_last} of {at_last}), and {words}, so the verdict is a finding about this budget, not "
                       "about converged models."
                       + _trend_clause(gap, chosen_learning_rates(rows, (CANDIDATE, REFERENCE)),
                                       cfg["train"].get("schedule")))
        elif words:
            budget += f"; {words}"
        verdict = ("not testable here: no interval (one seed, or one shared measurement)" if lo is None else
                   f"supported at this budget: MU has significantly lower test perplexity than the matched baseline "
                   f"{budget}" if lo > 0 else
                   f"not supported at this budget: MU has significantly higher test perplexity than the matched "
                   f"baseline {budget}" if hi < 0 else
                   f"not supported at this budget: no significant gain - MU gains at most {hi:.2g}% over the "
                   f"baseline (95% CI), and its test perplexity is the lower on {_lower_on(rows)}, {budget}")
        claims.append({**m3, "measured": measured, "verdict": verdict})
    return claims


def _with_rates(comparisons: list[dict], cfg: dict, rows: list[dict]) -> list[dict]:
    """Each comparison (or the decision: `reference` for `parent`) whose two models trained at different learning
    rates (each chosen from `lr_grid`) says so after its reading: it compares the two as tuned, not the
    architectural change at one rate."""
    rates = chosen_learning_rates(rows, CONFIGURATIONS) if cfg.get("lr_grid") else {}
    out = []
    for c in comparisons:
        other = c.get("parent", c.get("reference"))
        mine, theirs = rates.get(c["candidate"]), rates.get(other)
        if mine is not None and theirs is not None and mine != theirs:
            c = {**c, "text": c["text"].rstrip() + f" Each trained at its own chosen learning rate (`{c['candidate']}` "
                 f"{mine:g}, `{other}` {theirs:g}): this compares the two as tuned, not the change at one rate."}
        out.append(c)
    return out


def _lower_on(rows: list[dict]) -> str:
    """'2 of 5 seeds': on how many of the seeds both models finished MU's test perplexity is below the baseline's."""
    test = {c: {r["seed"]: r["metrics"].get("test_ppl") for r in rows if r["config"] == c and r["status"] == "ok"}
            for c in (CANDIDATE, REFERENCE)}
    seeds = [s for s, v in test[CANDIDATE].items() if v is not None and test[REFERENCE].get(s) is not None]
    return f"{sum(test[CANDIDATE][s] < test[REFERENCE][s] for s in seeds)} of {plural(len(seeds), 'seed')}"


def _rates_text(cfg: dict, rows: list[dict]) -> str:
    """The learning rate the run trained at: train.lr, or each model's where a search chose them."""
    chosen = chosen_learning_rates(rows, (CANDIDATE, "mu-simple", REFERENCE)) if cfg.get("lr_grid") else {}
    return ", ".join(f"{lr:g} ({c})" for c, lr in chosen.items()) or f"{cfg['train']['lr']:g}"


def chosen_learning_rates(rows: list[dict], configs: tuple[str, ...]) -> dict[str, float]:
    """{config: the learning rate its cells trained at} for the configurations whose cells agree on one."""
    rates = {c: {r["details"].get("lr") for r in rows if r["config"] == c and r["status"] == "ok"} for c in configs}
    return {c: next(iter(v)) for c, v in rates.items() if len(v) == 1 and None not in v}


def learning_rate_clause(cfg: dict, rows: list[dict], configs: tuple[str, ...]) -> str:
    """How the compared models' learning rates were set, for a verdict: chosen per model from `lr_grid` (and where a
    choice is the grid's edge, that the best may lie beyond it), or one shared rate tuned for neither."""
    grid = cfg.get("lr_grid")
    chosen = chosen_learning_rates(rows, configs)
    if not grid or len(chosen) < len(configs):
        return (f"at one learning rate shared by both and tuned for neither (train.lr = {cfg['train']['lr']:g}; "
                "`lr_grid=[...]` chooses each model's on a tuning seed first, and one suited to either model could "
                "change the gap)")
    tuning = lr_search.tuning_seeds(cfg.get("tuning_seed", 7))
    on = "the tuning seed" if len(tuning) == 1 else f"{len(tuning)} tuning seeds (their geometric mean)"
    said = (f"at each model's own learning rate, chosen from {', '.join(f'{v:g}' for v in grid)} by validation "
            f"perplexity on {on} ({', '.join(f'`{c}` {lr:g}' for c, lr in chosen.items())})")
    edge = lr_search.edge_choices(grid, chosen)
    if edge:
        said += (f"; {' and '.join(f'`{c}`' for c in edge)} chose an end of the grid, so a better rate may lie "
                 "beyond it")
    return said


def curve_gap(run: RunDir, rows: list[dict], candidate: str, reference: str) -> dict | None:
    """`candidate`'s validation perplexity relative to `reference`'s at every evaluation step that every seed of both
    made, paired by seed (`stats.paired_relative_change`: the geometric mean of the per-seed ratios, with a 95%
    t-interval), and `trend`: how that ratio changed over the second half of the run - from the first evaluation at
    or after half the last one's step (`middle`) to the last - paired by seed (negative: the candidate's perplexity
    came closer to the reference's, or moved further below it). The first half is left out: early in training the
    gap swings widely, and whether more training would change the verdict is a question about the end.
    `late_trend`: the same over the last quarter alone (from `late_from`, as `late_change` counts it), so a gap that
    moved early in the second half and then levelled off is told from one still moving at the end; None where the
    last quarter starts no later than the second half. None with fewer than two shared evaluations."""
    from lmlab import stats

    seeds = sorted({r["seed"] for r in rows if r["config"] == candidate and r["status"] == "ok"}
                   & {r["seed"] for r in rows if r["config"] == reference and r["status"] == "ok"})
    # {config: {seed: {step: val_ppl}}}: one evaluation per step and cell (the last, were there two)
    curves = {c: {s: {step: values[-1] for step, values in curve.items()}
                  for s, curve in seed_curves(run, c, "eval", "val_ppl").items() if s in seeds}
              for c in (candidate, reference)}
    if any(len(curves[c]) < len(seeds) for c in curves):  # a finished cell without its curve: nothing to pair
        return None
    steps = sorted(set.intersection(*(set(curve) for c in curves.values() for curve in c.values()))) if seeds else []
    if len(steps) < 2:
        return None
    middle = second_half_start(steps)
    ratio = {step: {s: curves[candidate][s][step] / curves[reference][s][step] for s in seeds} for step in steps}
    late = _late_start(steps)
    return {"candidate": candidate, "reference": reference, "seeds": seeds, "middle": middle, "late_from": late,
            "late_trend": stats.paired_relative_change(ratio[steps[-1]], ratio[late]) if late > middle else None,
            "changes": [{"step": step, **stats.paired_relative_change(
                {s: curves[candidate][s][step] for s in seeds}, {s: curves[reference][s][step] for s in seeds})}
                for step in steps],
            "trend": stats.paired_relative_change(ratio[steps[-1]], ratio[middle])}


def _gap_words(gap: dict) -> tuple[str, str, str]:
    """(change at the middle of the run, at its end, what the trend says) of a `curve_gap`, in words."""
    first = next(c for c in gap["changes"] if c["step"] == gap["middle"])
    last, trend = gap["changes"][-1], gap["trend"]

    if trend is None or not trend.get("ci95"):
        said = "no interval for its change (fewer than two seeds or one shared value)"
    else:
        ci = trend["ci95"]
        moved = f"the ratio changed by {change_cell(trend)}, paired by seed"
        if ci[0] <= 0 <= ci[1]:
            said = f"no significant change ({moved})"
        elif first["delta_pct"] * last["delta_pct"] <= 0:
            said = f"it changed sign ({moved})"
        else:  # one sign throughout: the ratio moving towards 1 is the gap narrowing
            said = ("it narrowed" if abs(last["delta_pct"]) < abs(first["delta_pct"]) else "it widened") + f" ({moved})"
        late = gap.get("late_trend")
        if late and late.get("ci95") and not said.startswith("no significant"):
            span = f"from step {gap['late_from']} to step {last['step']}"
            against = (late["ci95"][0] > 0 or late["ci95"][1] < 0) and (late["delta_pct"] > 0) != (
                trend["delta_pct"] > 0)
            if against:  # the last quarter moved back: not a gap that kept narrowing (or widening)
                said += (f", but it moved back over the last quarter of training: {span} the ratio changed by "
                         f"{change_cell(late)}")
            elif abs(late["delta_pct"]) < abs(trend["delta_pct"]) / 2:
                said += f", mostly before the last quarter of training: {span} the ratio changed by only " \
                        f"{change_cell(late)}"
            else:
                said += f"; over the last quarter of training, {span}, the ratio changed by {change_cell(late)}"
    return change_cell(first), change_cell(last), said


def _trend_clause(gap: dict | None, rates: dict[str, float] | None = None, schedule: str | None = None) -> str:
    """For M3's verdict: how the validation gap moved over the second half of the run (a sentence). A narrowing gap
    is not read as a trend that more training continues: where the two models train at different peak rates
    (`rates`) on a schedule that decays them, the one at the larger rate gains more as the rate anneals, which alone
    narrows a gap it opened mid-run."""
    if not gap:
        return ""
    first, last, said = _gap_words(gap)
    text = (f" Over the second half of the run the validation gap went from {first} at step {gap['middle']} to "
            f"{last} at step {gap['changes'][-1]['step']}: {said}")
    late = gap.get("late_trend")
    reversed_late = bool(late and late.get("ci95") and (late["ci95"][0] > 0 or late["ci95"][1] < 0)
                         and gap["trend"] and (late["delta_pct"] > 0) != (gap["trend"]["delta_pct"] > 0))
    if said.startswith("it narrowed") and not reversed_late:
        pair = [rates.get(gap["candidate"]), rates.get(gap["reference"])] if rates else [None, None]
        behind = next(c for c in gap["changes"] if c["step"] == gap["middle"])["delta_pct"] > 0  # candidate worse
        # annealing narrows a gap only where the model behind at mid-run trains at the larger peak rate
        anneals = (None not in pair and schedule in ("cosine", "linear")
                   and (pair[0] > pair[1] if behind else pair[1] > pair[0]))
        if anneals:
            text += (f". The two train at different peak learning rates (`{gap['candidate']}` {pair[0]:g}, "
                     f"`{gap['reference']}` {pair[1]:g}) on a {schedule} schedule that decays them, and the model "
                     "behind at mid-run has the larger rate, so it gains more as the rate decays: the narrowing need "
                     "not go on with more training; whether a longer schedule would close the gap, this run cannot "
                     "say")
        else:
            text += "; whether more training would close it, this run cannot say"
    return text + "."


def _gap_lines(gap: dict | None) -> list[str]:
    """The report's table of the paired validation gap at every evaluation, and how it moved."""
    if not gap:
        return []
    lines = [f"`{gap['candidate']}` vs `{gap['reference']}` at each evaluation every seed made (validation perplexity, "
             f"candidate / reference - 1, geometric mean over {len(gap['seeds'])} paired seeds with a 95% t-interval):",
             "", "| step | change [95% CI] (p) |", "|---|---|"]
    lines += [f"| {c['step']} | {change_cell(c)} |" for c in gap["changes"]]
    first, last, said = _gap_words(gap)
    lines += ["", f"Over the second half of the run (step {gap['middle']} to step {gap['changes'][-1]['step']}; "
              "earlier in training the gap swings widely) it went from "
              f"{first} to {last}: {said}.", ""]
    return lines


def best_at_last(rows: list[dict], configs: tuple[str, ...]) -> int:
    """The number of finished cells of `configs` when every one had its best validation perplexity at its last step
    (no checkpoint selection took place); 0 otherwise. Under a schedule that decays the learning rate to 0 this says
    little about whether the models were still improving: `late_change` measures that."""
    cells = [r for r in rows if r["config"] in configs and r["status"] == "ok"]
    last = [r["metrics"].get("best_step") == r["details"].get("steps") for r in cells]
    return len(cells) if cells and all(last) else 0


LATE_FRACTION = 0.75  # "the last quarter of training": from the first evaluation at or after 75% of the last step


def _late_start(steps: list[int]) -> int:
    """The first of the sorted evaluation `steps` in the last quarter of training (at or after LATE_FRACTION of the
    last one), never the last itself (at least two steps)."""
    start = next(step for step in steps if step >= LATE_FRACTION * steps[-1])
    return steps[-2] if start == steps[-1] else start


def late_change(run: RunDir, rows: list[dict], configs: list[str]) -> dict | None:
    """How validation perplexity moved over the last quarter of training, per configuration: from the first
    evaluation at or after LATE_FRACTION of the last evaluation's step (`from`) to the last (`to`), paired by seed
    (`stats.paired_relative_change`; negative: still falling). Only steps every seed of every listed configuration
    evaluated; None with fewer than two such steps."""
    from lmlab import stats

    curves = {}
    for config in configs:
        seeds = {r["seed"] for r in rows if r["config"] == config and r["status"] == "ok"}
        by_seed = {s: {step: v[-1] for step, v in c.items()}
                   for s, c in seed_curves(run, config, "eval", "val_ppl").items() if s in seeds}
        if seeds and len(by_seed) == len(seeds):
            curves[config] = by_seed
    if not curves:
        return None
    steps = sorted(set.intersection(*(set(c) for by_seed in curves.values() for c in by_seed.values())))
    if len(steps) < 2:
        return None
    start = _late_start(steps)
    return {"from": start, "to": steps[-1],
            "changes": {c: stats.paired_relative_change({s: v[steps[-1]] for s, v in by_seed.items()},
                                                        {s: v[start] for s, v in by_seed.items()})
                        for c, by_seed in curves.items()}}


def late_words(late: dict | None, configs: tuple[str, ...] | list[str], train: dict) -> tuple[str, bool]:
    """(a clause on how val_ppl moved over the last quarter of training in `configs`, whether it still fell
    significantly in every one of them); ("", False) without the curves."""
    if not late or not all(late["changes"].get(c) for c in configs):
        return "", False
    intervals = {c: late["changes"][c].get("ci95") for c in configs}
    falling = all(ci is not None and ci[1] < 0 for ci in intervals.values())
    rising = [c for c, ci in intervals.items() if ci is not None and ci[0] > 0]
    unknown = [c for c, ci in intervals.items() if ci is None]
    decays = train.get("schedule") in ("cosine", "linear")
    decay = ""
    if decays:
        ratio = train.get("min_lr_ratio", 0.0)
        decay = (f", as the {train['schedule']} schedule takes the learning rate to "
                 + ("0" if not ratio else f"{ratio:g} times its peak"))
    changes = ", ".join(f"`{c}` {change_cell(late['changes'][c])}" for c in configs)
    names = lambda cs: ", ".join(f"`{c}`" for c in cs)  # noqa: E731
    if falling:
        reading = "still falling in every one at the end of this budget"
    elif rising:
        reading = f"rising in {names(rising)} (worse at the end than a quarter before: overfitting or instability)"
    elif unknown:
        reading = f"no interval for {names(unknown)} (one seed or one shared value), so whether it still fell is open"
    else:
        reading = ("not falling significantly in every one" + (": near where this schedule levels off" if decays else
                                                                ""))
    return (f"over the last quarter of training (from its first evaluation, at step {late['from']}, to the last, at "
            f"step {late['to']}{decay}) val_ppl changed by {changes}: {reading}"), falling


def _first_ok(rows: list[dict], config: str) -> dict | None:
    return next((r for r in rows if r["config"] == config), None)


def _mean(summary: dict, config: str, metric: str):
    desc = summary["configs"].get(config, {}).get("metrics", {}).get(metric)
    return desc["mean"] if desc else None


def _side_by_side(summary: dict, rows: list[dict], configs: list[str], cfg: dict,
                  late: dict | None = None) -> list[str]:
    count = cfg["match"]["count"]
    budget = _first_ok(rows, MATCHED_TO)
    target = budget["metrics"][f"params_{count}"] if budget else None
    cells = [r for r in rows if r["status"] == "ok"]
    earlier = sum(r["metrics"].get("best_step") != r["details"].get("steps") for r in cells)
    selection = (f"Each cell keeps its checkpoint of lowest validation perplexity; in {earlier} of {len(cells)} cells "
                 "that was an earlier evaluation than the last, so val_ppl is optimistic there; the decision uses "
                 "test_ppl." if earlier else
                 "Each cell keeps its checkpoint of lowest validation perplexity; here that was the last evaluation "
                 f"in every cell ({len(cells)} of {len(cells)}), so no selection took place; the decision uses "
                 "test_ppl.")
    words, _ = late_words(late, [c for c in configs if late and late["changes"].get(c)], cfg["train"])
    if words:
        selection += f" {words[0].upper()}{words[1:]}."
    lines = ["## Models side by side (mean over seeds)", "",
             f"The dense baseline's width is solved so that its {count.replace('_', '-')} parameter count matches "
             f"{MATCHED_TO}'s within {cfg['match'].get('tolerance', 0.02):.0%}, with a head count between half and "
             f"twice MU's cross-attention heads. {selection} accuracy: next-token (argmax) accuracy on the "
             f"validation split; tokens/s: training throughput.", "",
             "| configuration | layers | state width | attention | embeddings | params total | params non-embedding | "
             f"{count} vs {MATCHED_TO} | val_ppl | test_ppl | accuracy | val_bpb | tokens/s |",
             "|" + "---|" * 13]
    for name in configs:
        row = _first_ok(rows, name)
        if row is None:
            continue
        model = row["details"]["model"]["config"]
        if row["details"]["model"]["kind"] == "mu":
            width = f"{model['grid']}x{model['grid']} = {model['grid'] ** 2}"
            n_blocks = model["grid"] ** 2 // (model["block_shape"][0] * model["block_shape"][1])
            attention = (f"{n_blocks} blocks of {model['block_shape'][0]}x{model['block_shape'][1]} + "
                         f"{model['cross_heads']} cross heads")
        else:
            width, attention = str(model["width"]), f"{model['n_heads']} heads"
        mine = row["metrics"][f"params_{count}"]
        diff = f"{100 * (mine - target) / target:+.2f}%" if target else "-"
        cells = [name, str(model["n_layers"]), width, attention, "tied" if model["tie_embeddings"] else "untied",
                 f"{row['metrics']['params_total']:,}",
                 f"{row['metrics']['params_non_embedding']:,}", diff]
        cells += [mean_text(summary["configs"].get(name, {}).get("metrics", {}).get(m))
                  for m in ("val_ppl", "test_ppl", "accuracy", "val_bpb")]
        tps = _mean(summary, name, "tokens_per_s")
        cells.append(f"{tps:,.0f}" if tps is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


NOTES_BANDS = (200.0, 300.0)  # the notes' success / partial thresholds, for WikiText-2


def beside_thresholds(value: float | None, thresholds: tuple[float, ...]) -> str:
    """`value` as the report prints it (`fmt`, 4 significant digits) or, where that rounding would hide which side of a
    threshold it lies on (10.0009 printed as 10 against success < 10), to the decimal place of the first significant
    digit of its distance to that threshold (10.0009), or further until the printed number is on the value's side of
    every threshold."""
    text = fmt(value)
    if value is None or not math.isfinite(value):
        return text

    def sides(x: float) -> list[int]:
        return [(x > t) - (x < t) for t in thresholds]

    if sides(float(text.replace(",", ""))) == sides(value):
        return text
    distances = [abs(value - t) for t in thresholds if value != t]
    places = max(0, -math.floor(math.log10(min(distances)) + 1e-9)) if distances else 0  # 1e-9: 14 - 13.99999
    while sides(round(value, places)) != sides(value) and places < 17:
        places += 1
    return f"{value:,.{places}f}" if abs(value) >= 1e4 else f"{value:.{places}f}"  # fmt's thousands separators


def band_cell(value: float | None, seed_bands: list[str], success: float, partial: float) -> str:
    """The band of the mean over seeds and, where seeds fall in other bands, how many of them and by which rule:
    'partial (3 of 5 seeds < 10)'."""
    band = ppl_band(value, success, partial)
    rules = {"success": f"< {success:g}", "partial": f"in {success:g}-{partial:g}", "failure": f"> {partial:g}"}
    other = [f"{seed_bands.count(b)} of {len(seed_bands)} seeds {rules[b]}" for b in rules
             if b != band and b in seed_bands]
    return f"{band} ({', '.join(other)})" if other else band


def _bands(summary: dict, rows: list[dict], configs: list[str], cfg: dict) -> list[str]:
    metric, success, partial = cfg["band_metric"], cfg["success_ppl"], cfg["partial_ppl"]
    whose = ("the notes' thresholds" if (success, partial) == NOTES_BANDS else
             "this run's thresholds, not the notes' 200 / 300 for WikiText-2, which do not carry over to other data; "
             "bands describe the run, they test nothing: the paired comparison above decides")
    thresholds = "their thresholds" if (success, partial) == NOTES_BANDS else "this run's thresholds"
    lines = ["## Perplexity bands", "",
             f"The notes' banding rule on {metric}, with {thresholds}: success < {success:g}, partial "
             f"{success:g}-{partial:g}, failure > {partial:g} (`success_ppl`, `partial_ppl`: {whose}). The band of "
             "the mean over seeds (where seeds fall in other bands, how many), and how many seeds fall in each band.",
             "",
             f"| configuration | mean {metric} | band of the mean | seeds per band |", "|---|---|---|---|"]
    close = []
    for name in configs:
        value = _mean(summary, name, metric)
        if value is not None:
            bands = [ppl_band(r["metrics"].get(metric), success, partial) for r in rows
                     if r["config"] == name and r["status"] == "ok"]
            counts = ", ".join(f"{b} {bands.count(b)}" for b in ("success", "partial", "failure") if b in bands)
            shown = beside_thresholds(value, (success, partial))
            lines.append(f"| {name} | {shown} | {band_cell(value, bands, success, partial)} | {counts} of "
                         f"{len(bands)} |")
            if shown != fmt(value):
                threshold = min((success, partial), key=lambda t: abs(value - t))
                std = summary["configs"][name]["metrics"][metric].get("std")
                close.append(f"`{name}`'s mean {metric} is printed here to more digits than elsewhere in the report: "
                             f"it lies {abs(value - threshold):.1g} "
                             f"{'above' if value > threshold else 'below'} the threshold {threshold:g}, so its band "
                             "of the mean turns on that margin" +
                             (f", far less than the spread over seeds (std {fmt(std, 2)})" if std and
                              std > 10 * abs(value - threshold) else "") + ".")
    if close:
        lines += ["", *close]
    return lines + [""]


def _learning_rate_section(run: RunDir, rows: list[dict], configs: list[str], cfg: dict) -> list[str]:
    """How each model's learning rate was set: the search (`lr_grid`), or the one rate every model shares."""
    tuning = lr_search.read_search(run.root) if cfg.get("lr_grid") else None
    if tuning:
        searched = lr_search.search_lines(tuning, "its own initialisation and data order; the validation split, "
                                          "which also selects each cell's checkpoint, while the decision is on the "
                                          "test split")
        edge = lr_search.edge_choices(tuning["grid"], {c: e["lr"] for c, e in tuning["configs"].items()})
        if edge:
            searched[0] += (f" {', '.join(f'`{c}`' for c in edge)} chose an end of the grid: a better rate may lie "
                            "beyond it.")
        return ["## Learning rate", "", *searched, ""]
    return ["## Learning rate", "",
            f"Every model trains at lr = {cfg['train']['lr']:g}, tuned for none of them: a comparison at one shared "
            "rate can favour whichever model it happens to suit. `lr_grid=[...]` chooses each model's rate by "
            f"validation perplexity on a tuning seed (`tuning_seed`, {cfg.get('tuning_seed', 7)}; a list of seeds: "
            "their geometric mean) before the seeds run.", ""]


def _validation_curves_plot(run: RunDir, configs: list[str]) -> bool:
    """Validation perplexity at every evaluation, log scale: the mean over seeds, shaded between the lowest and highest
    seed, one style per configuration of `configs` (the run's full list)."""
    curves = cell_curves(run, configs, "eval", "val_ppl")
    if not curves:
        return False
    line_plot(run, "validation_curves.png", mean_over_seeds(curves), styles=config_styles(configs),
              xlabel="optimizer step", ylabel="validation perplexity (mean over seeds)",
              title="Validation perplexity: MU vs the dense baseline", logy=True, integer_x=True)
    return True


def _validation_gap_plot(run: RunDir, gap: dict | None, configs: list[str]) -> bool:
    """The paired gap of `curve_gap` at every evaluation: candidate / reference - 1 in %, the geometric mean over
    seeds with its 95% t-interval shaded - what the seed bands of the curves plot cannot show (seeds that move
    together leave wide, overlapping bands around a consistent gap)."""
    points = [c for c in (gap or {}).get("changes", []) if c.get("ci95")]
    if len(points) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = [c["step"] for c in points]
    colour = config_styles(configs)[gap["candidate"]]["color"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.fill_between(steps, [c["ci95"][0] for c in points], [c["ci95"][1] for c in points], color=colour, alpha=0.2,
                    label=f"95% t-interval over {len(gap['seeds'])} paired seeds")
    ax.plot(steps, [c["delta_pct"] for c in points], color=colour, marker="o", fillstyle="none",
            label=f"{gap['candidate']} / {gap['reference']} - 1 (geometric mean over seeds)")
    ax.axhline(0.0, color="grey", linewidth=1, label="no gap")
    ax.axvline(gap["middle"], color="grey", linestyle=":", linewidth=1, label="first evaluation of the second half")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    label_axes(ax, xlabel="optimizer step", ylabel=f"validation perplexity of {gap['candidate']} vs "
               f"{gap['reference']}, paired by seed (%)", title="MU vs dense baseline: the paired gap")
    save_figure(fig, run, "validation_gap.png")
    return True


def _red_flags(rows: list[dict]) -> list[str]:
    flags = [(r["config"], r["seed"], f) for r in rows if r["status"] == "ok"
             for f in r["details"].get("red_flags", [])]
    flags += [(r["config"], r["seed"], {"flag": "out-of-memory", "step": None, "epoch": None, "message": r["error"]})
              for r in rows if r["status"] != "ok" and (r.get("error") or "").startswith(OutOfMemory.__name__)]
    lines = ["## Red flags", "",
             "Checked at every evaluation: plateau (no new best validation perplexity for `monitor.patience` "
             "evaluations), oscillation (validation loss rising on `monitor.rising` consecutive evaluations), "
             "out of memory (the cell fails with a smaller `max_seq_len` / batch to try).", ""]
    if not flags:
        return lines + ["None raised.", ""]
    lines += ["| configuration | seed | flag | step | epoch | message |", "|---|---|---|---|---|---|"]
    lines += [f"| {c} | {s} | {f['flag']} | {fmt(f['step'])} | {fmt(f['epoch'])} | {f['message'].replace('|', '/')} |"
              for c, s, f in flags]
    return lines + [""]


def _samples(rows: list[dict], configs: list[str], cfg: dict) -> list[str]:
    gen = cfg["generation"]
    every = "every epoch" if gen["every_epochs"] == 1 else f"every {plural(gen['every_epochs'], 'epoch')}"
    lines = ["## Generation samples (best checkpoint, loaded back)", "",
             f"temperature {gen['temperature']:g}, top-k {gen['top_k']}, top-p {gen['top_p']:g}, repetition penalty "
             f"{gen['repetition_penalty']:g}, {gen['max_new_tokens']} new tokens; every cell's samples during "
             f"training ({every}) are in `cells/<config>/seed-<s>/{SAMPLES_FILE}`. Every model samples with the "
             "same random seed, so where their next-token distributions are alike their samples start alike: a "
             "shared opening says the models agree on those tokens, not that they are the same model.", ""]
    for name in configs:
        row = _first_ok(rows, name)
        if row is None:
            continue
        lines.append(f"**{name}** (seed {row['seed']}, checkpoint `{row['details']['checkpoint']}`):")
        lines.append("")
        for s in row["details"]["samples"]:
            lines.append(f"> **{s['prompt']}** {' '.join(s['text'].split())}")
            lines.append("")
    return lines


MU = MUStudy()
