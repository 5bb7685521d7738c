"""Choosing each configuration's learning rate before the seeds run (`lr_grid`, `tuning_seed`).

One run per configuration and grid value on a tuning seed - its own initialisation and training order, never a
study seed - scored on the validation split; the lowest score wins. The search is saved to `lr_tuning.json` as it
goes, so an interrupted one resumes where it stopped, and the report prints it (`read_search`, `search_lines`). A
study decides on other data (HyLoRADA: its seeds' validation documents, drawn apart from the tuning seed's where
the split allows; MU: the test split), so the choice is not made on what it is judged on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from lmlab.engine import distributed as D
from lmlab.engine.hooks import Display
from lmlab.fileio import atomic_write_text
from lmlab.studies.report import fmt

SEARCH_FILE = "lr_tuning.json"


def check_grid(grid: list[float] | None, tuning_seed: int, seeds: list[int]) -> None:
    """A config validator's part (raises ValueError): every grid value positive, the tuning seed no study seed."""
    if grid is None:
        return
    if any(lr <= 0 for lr in grid):
        raise ValueError(f"lr_grid={grid} holds a learning rate <= 0")
    if tuning_seed in seeds:
        raise ValueError(f"tuning_seed={tuning_seed} is one of the study's seeds; choose another so the learning "
                         "rate is not chosen on the data it is evaluated on")


def search(root: Path, grid: list[float], tuning_seed: int, configs: list[str],
           score: Callable[[str, float, dict[str, float]], float], display: Display) -> dict[str, float]:
    """{config: chosen learning rate}: for each configuration in order, `score(config, lr, chosen)` (lower is
    better; `chosen`: the learning rates chosen so far) at every grid value. A saved search of another grid or
    tuning seed starts over."""
    path = root / SEARCH_FILE
    record = json.loads(path.read_text()) if path.exists() else {}
    if record.get("grid") != grid or record.get("seed") != tuning_seed:
        record = {"grid": grid, "seed": tuning_seed, "configs": {}}
    for config in configs:
        if config in record["configs"]:
            continue
        chosen = {c: v["lr"] for c, v in record["configs"].items()}
        scores = {f"{lr:g}": score(config, lr, chosen) for lr in grid}
        best = min(grid, key=lambda lr: scores[f"{lr:g}"])
        record["configs"][config] = {"lr": best, "val_ppl": scores}
        display.line(f"lr search: {config} -> lr {best:g} ({', '.join(f'{k}: {v:.4g}' for k, v in scores.items())})")
        if D.is_main():
            atomic_write_text(path, json.dumps(record, indent=2))
    return {c: v["lr"] for c, v in record["configs"].items()}


def read_search(root: Path) -> dict | None:
    """A run's saved search ({grid, seed, configs: {config: {lr, val_ppl}}}), None where it searched none."""
    path = root / SEARCH_FILE
    return json.loads(path.read_text()) if path.exists() else None


def search_lines(tuning: dict, what: str) -> list[str]:
    """The report's account of a search (`read_search`): how each learning rate was chosen (`what`: on which
    validation data) and every score."""
    grid = tuning["grid"]
    lines = [f"Each configuration's learning rate was chosen from {', '.join(f'{v:g}' for v in grid)} by the "
             f"validation perplexity of one run on the tuning seed {tuning['seed']} ({what}), before the seeds ran.",
             "", "| configuration | chosen lr | " + " | ".join(f"val_ppl at {v:g}" for v in grid) + " |",
             "|" + "---|" * (len(grid) + 2)]
    for name, entry in tuning["configs"].items():
        lines.append(f"| {name} | {entry['lr']:g} | " + " | ".join(fmt(entry["val_ppl"].get(f"{v:g}")) for v in grid)
                     + " |")
    return lines


def edge_choices(grid: list[float], chosen: dict[str, float]) -> list[str]:
    """The configurations whose chosen learning rate is the grid's smallest or largest: the best may lie beyond it."""
    return [name for name, lr in chosen.items() if lr in (min(grid), max(grid))]
