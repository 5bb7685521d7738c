"""Evaluation of the bridge against its baselines and controls on the same items (docs/latentwire.md section 4).

Systems:
- `target_text` / `source_text`: each model alone on the few-shot text prompt;
- `bridged`: source -> translator -> target, in the bridge's conditioning mode;
- `token_budget`: the target given only the question's first K target tokens + the answer cue;
- `zero_prefix` (soft tokens all 0) and `shuffled_source` (the source reads another item's prompt,
  through a fixed derangement): bridged accuracy only means information crossed the bridge if it
  beats both.

Costs are measured from the encoded prompts and the model configs. `prompt_tokens` counts the positions
of the generating model's prompt (BOS, soft tokens and cue included); for `source_text` they are source
tokenizer tokens. `kv_bytes` is the KV cache of that prompt in the generating model (for the bridged
systems the target's; the source's cache is freed before the target generates). `compression` = text
context tokens / context positions of the system, where the context is everything before the answer
cue except BOS: for `bridged` in `soft_only` mode that is K, so it is text prompt tokens / K.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean

import torch

from lmlab import progress as bars
from lmlab.errors import ConfigError, DataError
from lmlab.eval.generation import greedy_generate, left_pad
from lmlab.fileio import atomic_write_text
from lmlab.latentwire.bridge import LatentWireBridge, pad_token_id
from lmlab.latentwire.costs import element_bytes, kv_cache_bytes, prompt_lengths
from lmlab.latentwire.gsm8k import STOP_STRINGS, cut_at_stop, extract_flexible, extract_strict, gold_answer
from lmlab.stats import wilson_interval

SYSTEMS = ("target_text", "source_text", "bridged", "token_budget", "zero_prefix", "shuffled_source")
SHARED_SYSTEMS = ("target_text", "source_text", "token_budget")  # translator-free: one evaluation shared by the cells
METRICS = ("acc_strict", "acc_flexible", "invalid_rate", "acc_flexible_wilson95", "prompt_tokens", "compression",
           "kv_bytes", "kv_bytes_saved", "latency_s", "tokens_per_s")
SAMPLES_FILE = "eval_samples.jsonl"


@dataclass
class SystemRun:
    """What one system produced on the items, with the measurements its costs come from."""

    outputs: list[str]  # generated text as produced (a stop string it ended on included)
    prompt_tokens: list[int]  # per item: positions of the generating model's prompt
    context_tokens: list[int]  # per item: positions standing for the context (before the cue, without BOS)
    text_context_tokens: list[int]  # per item: the uncompressed text context in the same tokenizer
    new_tokens: int  # tokens generated over all items
    seconds: float  # wall clock over all items (prompt building, source pass, generation)
    kv_bytes: float  # KV cache of the mean prompt in the generating model


def derangement(n: int) -> list[int]:
    """A fixed permutation without fixed points: item i is paired with item i+1 (cyclically)."""
    if n < 2:
        raise DataError("shuffled_source needs at least 2 evaluation items")
    return [(i + 1) % n for i in range(n)]


def _generated_lengths(tokens: torch.Tensor, eos_id: int | None, pad_id: int) -> list[int]:
    """Tokens each row generated before it stopped (finished rows are filled with `pad_id`)."""
    lengths = []
    for row in tokens.tolist():
        if eos_id is not None and eos_id in row:
            lengths.append(row.index(eos_id) + 1)
        else:
            lengths.append(max((i + 1 for i, t in enumerate(row) if t != pad_id), default=0))
    return lengths


def _generate(model, tokenizer, mask: torch.Tensor, max_new_tokens: int, **inputs) -> tuple[list[str], int]:
    pad = pad_token_id(tokenizer)
    tokens = greedy_generate(model, mask, max_new_tokens, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad,
                             stop_strings=STOP_STRINGS, tokenizer=tokenizer, **inputs)
    lengths = _generated_lengths(tokens, tokenizer.eos_token_id, pad)
    texts = [tokenizer.decode(row[:n], skip_special_tokens=True, clean_up_tokenization_spaces=False)
             for row, n in zip(tokens.tolist(), lengths, strict=True)]
    return texts, sum(lengths)


def run_system(bridge: LatentWireBridge, system: str, items: Sequence[dict], *, batch_size: int = 8,
               max_new_tokens: int = 256) -> SystemRun:
    """Greedy, batched generation of one system on every item."""
    if system not in SYSTEMS:
        raise ConfigError(f"unknown system {system!r}; choose from {', '.join(SYSTEMS)}")
    enc = bridge.encoder
    device = bridge.translator.queries.device
    side = "source" if system == "source_text" else "target"
    model = bridge.source if side == "source" else bridge.target
    tokenizer = enc.tokenizers[side]
    shuffled = derangement(len(items)) if system == "shuffled_source" else None
    outputs, prompt_tokens, new_tokens = [], [], 0
    start = time.perf_counter()
    for lo in bars.bar(range(0, len(items), batch_size), desc=f"generating {system}", unit="batch"):
        batch = list(items[lo: lo + batch_size])
        if system in ("target_text", "source_text", "token_budget"):
            prompts = [enc.budget_prompt(it) if system == "token_budget" else enc.text_prompt(it, side)
                       for it in batch]
            ids, mask = left_pad(prompts, pad_token_id(tokenizer), device=device)
            texts, n_new = _generate(model, tokenizer, mask, max_new_tokens, input_ids=ids)
        else:
            source_items = [items[j] for j in shuffled[lo: lo + batch_size]] if shuffled else None
            inputs_embeds, mask = bridge.generation_inputs(batch, source_items, zero_soft=system == "zero_prefix")
            texts, n_new = _generate(model, tokenizer, mask, max_new_tokens, inputs_embeds=inputs_embeds)
        outputs += texts
        prompt_tokens += prompt_lengths(mask)
        new_tokens += n_new
    seconds = time.perf_counter() - start
    text_context = [len(enc.context_ids(it, side)) for it in items]
    if system == "token_budget":
        context = [min(enc.num_queries, len(enc.question_ids(it))) for it in items]
    elif system in ("bridged", "zero_prefix", "shuffled_source"):
        context = [enc.num_queries + (n if enc.mode == "soft_plus_text" else 0) for n in text_context]
    else:
        context = text_context
    return SystemRun(outputs=outputs, prompt_tokens=prompt_tokens, context_tokens=context,
                     text_context_tokens=text_context, new_tokens=new_tokens, seconds=seconds,
                     kv_bytes=kv_cache_bytes(model.config, fmean(prompt_tokens), element_bytes(model)))



def score_outputs(outputs: Sequence[str], golds: Sequence[str]) -> list[dict]:
    """Per item: the output, its strict and flexible answers and whether each equals the gold number.

    Answers are read from the output up to the first stop string (the model starting a new question).
    """
    records = []
    for output, gold in zip(outputs, golds, strict=True):
        answer = cut_at_stop(output)
        strict, flexible = extract_strict(answer), extract_flexible(answer)
        records.append({"output": output, "strict": strict, "flexible": flexible,
                        "correct_strict": strict == gold, "correct_flexible": flexible == gold})
    return records


def system_metrics(system: str, run: SystemRun, records: Sequence[dict], reference_kv_bytes: float) -> dict:
    """Metrics `S/<name>` of one system from its scored records and measurements."""
    n = len(records)
    correct = sum(r["correct_flexible"] for r in records)
    metrics = {
        "acc_strict": sum(r["correct_strict"] for r in records) / n,
        "acc_flexible": correct / n,
        "invalid_rate": sum(r["flexible"] is None for r in records) / n,
        "acc_flexible_wilson95": wilson_interval(correct, n),
        "prompt_tokens": fmean(run.prompt_tokens),
        "compression": fmean(run.text_context_tokens) / max(fmean(run.context_tokens), 1e-9),
        "kv_bytes": run.kv_bytes,
        "kv_bytes_saved": reference_kv_bytes - run.kv_bytes,
        "latency_s": run.seconds / n,
        "tokens_per_s": run.new_tokens / run.seconds if run.seconds > 0 else 0.0,
    }
    return {f"{system}/{name}": value for name, value in metrics.items()}


@dataclass
class LatentWireEval:
    metrics: dict  # "S/metric" -> value
    samples: list[dict]  # one record per item (the lines of eval_samples.jsonl)
    notes: dict  # how to read some metrics (units, tokenizers)


def evaluate_latentwire(bridge: LatentWireBridge, items: Sequence[dict], *, systems: Sequence[str] = SYSTEMS,
                        batch_size: int = 8, max_new_tokens: int = 256) -> LatentWireEval:
    """Run every system on the same items; return metrics, per-item samples and notes."""
    if not items:
        raise DataError("no evaluation items")
    golds = [gold_answer(item) for item in items]
    enc = bridge.encoder
    # The reference KV cache is target_text's prompt, measured from its encoding even when it is not run.
    reference_kv = kv_cache_bytes(bridge.target.config, fmean([len(enc.text_prompt(it)) for it in items]),
                                  element_bytes(bridge.target))
    metrics: dict = {}
    per_system = {}
    for system in systems:
        run = run_system(bridge, system, items, batch_size=batch_size, max_new_tokens=max_new_tokens)
        per_system[system] = score_outputs(run.outputs, golds)
        metrics.update(system_metrics(system, run, per_system[system], reference_kv))
    samples = [{"index": i, "question": item["question"], "gold": gold,
                "systems": {system: records[i] for system, records in per_system.items()}}
               for i, (item, gold) in enumerate(zip(items, golds, strict=True))]
    notes = {
        "source_text/prompt_tokens": "counted in the source tokenizer; every other system in the target's",
        "kv_bytes": "KV cache of the generating model's prompt, from its config (GQA aware) and weight dtype",
        "mode": enc.mode,
        "num_queries": enc.num_queries,
    }
    return LatentWireEval(metrics=metrics, samples=samples, notes=notes)


def write_eval_samples(path: str | os.PathLike, samples: Sequence[dict]) -> Path:
    """Write one JSON line per item, atomically (temporary file + rename)."""
    path = Path(path)
    atomic_write_text(path, "".join(json.dumps(sample, ensure_ascii=False) + "\n" for sample in samples))
    return path


def _sample_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    files = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            # A run directory: the cells' test evaluations, not the validation evaluations made during training
            # (eval_samples_step<N>.jsonl, other items); a directory holding only those gives them.
            found = sorted(path.rglob(SAMPLES_FILE)) or sorted(path.rglob("eval_samples*.jsonl"))
            if not found:
                raise DataError(f"{path}: no eval_samples*.jsonl files in this directory")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path} does not exist")
    return files


def summarize_eval(paths: Sequence[str | os.PathLike]) -> dict[str, dict]:
    """Per system over all given files (or directories, searched recursively for eval_samples.jsonl, else
    for eval_samples*.jsonl): total items, valid answers (a number was extracted), invalid ones, flexible
    accuracy, and the number of distinct evaluations counted.

    Each distinct evaluation is counted once: the text-only systems (`SHARED_SYSTEMS`) are generated once per run
    (token_budget once per K) and copied into every cell's file, so a column identical to one already counted (the
    same `evaluation` name, items and outputs) is a copy and is skipped. The bridged systems are a new evaluation in
    every cell and are always counted."""
    counts: dict[str, dict] = {}
    seen: set[tuple] = set()
    files = _sample_files(paths)
    for file in files:
        columns: dict[str, list[tuple]] = {}
        try:
            lines = file.read_bytes().decode("utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise DataError(f"{file} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}): "
                            "give the eval_samples*.jsonl files a latentwire run writes") from None
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                sample = json.loads(line)
                for name, r in sample["systems"].items():
                    flexible, correct = r["flexible"], r["correct_flexible"]
                    # the writer's types: the extracted number as text (None: no number), whether it is the gold
                    if not isinstance(correct, bool) or not (flexible is None or isinstance(flexible, str)) or (
                            correct and flexible is None):
                        raise TypeError
                    columns.setdefault(name, []).append(
                        (r.get("evaluation"), sample.get("index"), sample.get("question"), r.get("output"),
                         flexible, correct))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise DataError(f"{file}:{lineno}: not an eval_samples line (expected JSON with "
                                "systems.<name>.flexible, the extracted answer as text or null, and "
                                "correct_flexible, true or false)") from None
        for name, column in columns.items():
            c = counts.setdefault(name, {"total": 0, "valid": 0, "invalid": 0, "correct": 0, "evaluations": 0})
            signature = (name, tuple(column))
            if name in SHARED_SYSTEMS and signature in seen:
                continue  # a copy of a shared evaluation already counted
            seen.add(signature)
            c["evaluations"] += 1
            for *_, flexible, correct in column:
                c["total"] += 1
                c["valid" if flexible is not None else "invalid"] += 1
                c["correct"] += correct
    if not any(c["total"] for c in counts.values()):
        raise DataError(f"{', '.join(map(str, files))}: no eval samples in {'it' if len(files) == 1 else 'them'} "
                        "(empty); give the eval_samples*.jsonl files of a latentwire run that evaluated items")
    return {name: {"total": c["total"], "valid": c["valid"], "invalid": c["invalid"],
                   "accuracy": c["correct"] / c["total"], "evaluations": c["evaluations"]}
            for name, c in counts.items()}


def format_eval_summary(summary: dict[str, dict]) -> str:
    """A plain-text table of `summarize_eval`'s result, one row per system."""
    width = max([len("system")] + [len(name) for name in summary])
    lines = [f"{'system':<{width}}  {'total':>7}  {'valid':>7}  {'invalid':>7}  {'accuracy':>8}  {'evaluations':>11}"]
    for name, s in summary.items():
        lines.append(f"{name:<{width}}  {s['total']:>7}  {s['valid']:>7}  {s['invalid']:>7}  {s['accuracy']:>8.3f}  "
                     f"{s['evaluations']:>11}")
    lines.append("(each distinct evaluation counted once: the text-only systems are shared by a run's cells)")
    return "\n".join(lines)
