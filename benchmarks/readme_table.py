"""The README's Performance table, generated from `lmlab bench` result files (one column per run).

    .venv/bin/python benchmarks/readme_table.py benchmarks/results/RUN1.json [RUN2.json ...]

Train-step rows show (GPT-2, Llama) pairs; every cell is the median ratio over interleaved rounds with its 95%
interval in parentheses. The target column says whether every value met its target, or how many did.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TRAIN = ("train_gpt2", "train_llama")
# (label, benchmark(s), ours, reference), in the README's order
ROWS = [
    ("LoRA step, ours / peft", TRAIN, "lmlab-lora", "peft-lora"),
    ("rsLoRA step, ours / peft", TRAIN, "lmlab-rslora", "peft-rslora"),
    ("DoRA step, ours / peft", TRAIN, "lmlab-dora", "peft-dora"),
    ("LoRA step, ours on SDPA / peft (adapters alone)", TRAIN, "lmlab-lora-sdpa", "peft-lora"),
    ("LoRA step, ours / floor on lmlab attention", TRAIN, "lmlab-lora", "floor-lmlab-attn"),
    ("rsLoRA step, ours / floor on lmlab attention", TRAIN, "lmlab-rslora", "floor-lmlab-attn"),
    ("DoRA step, ours / floor on lmlab attention", TRAIN, "lmlab-dora", "floor-lmlab-attn"),
    ("LoRA step, ours on SDPA / floor", TRAIN, "lmlab-lora-sdpa", "floor"),
    ("peft LoRA step / floor", TRAIN, "peft-lora", "floor"),
    ("peft DoRA step / floor", TRAIN, "peft-dora", "floor"),
    ("full fine-tuning step / floor", TRAIN, "full", "floor"),
    ("floor on lmlab attention / floor on SDPA", TRAIN, "floor-lmlab-attn", "floor"),
    ("full HyLoRADA (bias + landmarks) / rsLoRA step", ("hylorada",), "hylorada", "lmlab-rslora"),
    ("merged adapter / base forward", ("inference",), "merged", "base"),
    ("unmerged adapter / merged forward", ("inference",), "unmerged", "merged"),
    ("`lmlab eval ppl` / plain per-window loop, tokens/s", ("eval_ppl",), "lmlab", "plain_loop"),
    ("MU / parameter-matched dense step", ("mu",), "mu", "dense"),
]


def cell(row: dict | None) -> str:
    if row is None:
        return "-"
    interval = row.get("interval")
    return f"{row['ratio']:.3f}" + (f" ({interval[0]:.2f}-{interval[1]:.2f})" if interval else "")


def table(paths: list[Path]) -> str:
    runs = [{(r["benchmark"], r["ours"], r["reference"]): r for r in json.loads(p.read_text())["rows"]}
            for p in paths]
    names = [p.stem.split("T")[-1] if "T" in p.stem else p.stem for p in paths]
    header = "| comparison | " + " | ".join(f"run {i + 1} ({n})" for i, n in enumerate(names)) + " | target |"
    lines = [header, "|---|" + "---:|" * len(paths) + "---|"]
    for label, benchmarks, ours, reference in ROWS:
        found = [[run.get((b, ours, reference)) for b in benchmarks] for run in runs]
        if not any(r for rows in found for r in rows):
            continue
        cells = [", ".join(cell(r) for r in rows) for rows in found]
        measured = [r for rows in found for r in rows if r is not None]
        target = next((r["target"] for r in measured if r.get("target")), None)
        verdict = ""
        if target:
            met = sum(bool(r["met"]) for r in measured)
            verdict = f"{target}: " + ("met" if met == len(measured) else f"{met} of {len(measured)}")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {verdict} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    print(table([Path(a) for a in sys.argv[1:]]))
