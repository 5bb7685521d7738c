"""Choosing each configuration's learning rate before the seeds run (`lr_grid`, `tuning_seed`).

One run per configuration, grid value and tuning seed - its own initialisation and training order, never a study
seed - scored on the validation split; the lowest score wins, with several tuning seeds (`tuning_seed=[7, 8]`) the
lowest geometric mean over them, so one seed's luck does not pick a rate. The search is saved to `lr_tuning.json` as it
goes, so an interrupted one resumes where it stopped, and the report prints it (`read_search`, `search_lines`). A
study decides on other data (HyLoRADA: its seeds' validation documents, drawn apart from the tuning seed's where
the split allows; MU: the test split), so the choice is not made on what it is judged on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from lmlab.engine import distributed as D
from lmlab.engine.hooks import Display
from lmlab.fileio import atomic_write_text
from lmlab.studies.report import fmt

SEARCH_FILE = "lr_tuning.json"


def tuning_seeds(tuning_seed: int | list[int]) -> list[int]:
    """The tuning seeds of a `tuning_seed` field: one seed or a list of them."""
    return list(tuning_seed) if isinstance(tuning_seed, (list, tuple)) else [tuning_seed]


def check_grid(grid: list[float] | None, tuning_seed: int | list[int], seeds: list[int]) -> None:
    """A config validator's part (raises ValueError): every grid value positive, the tuning seeds distinct and none
    a study seed."""
    tuning = tuning_seeds(tuning_seed)
    if not tuning or len(set(tuning)) != len(tuning):
        raise ValueError(f"tuning_seed={tuning_seed} must be one seed or a list of distinct seeds")
    if grid is None:
        return
    if any(lr <= 0 for lr in grid):
        raise ValueError(f"lr_grid={grid} holds a learning rate <= 0")
    shared = [s for s in tuning if s in seeds]
    if shared:
        raise ValueError(f"tuning_seed={shared[0]} is one of the study's seeds; choose another so the learning "
                         "rate is not chosen on the data it is evaluated on")


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if all(v > 0 for v in values) else \
        sum(values) / len(values)


def search(root: Path, grid: list[float], tuning_seed: int | list[int], configs: list[str],
           score: Callable[[str, float, dict[str, float], int], float], display: Display) -> dict[str, float]:
    """{config: chosen learning rate}: for each configuration in order, `score(config, lr, chosen, seed)` (lower is
    better; `chosen`: the learning rates chosen so far) at every grid value and tuning seed; the lowest score wins,
    over several tuning seeds their geometric mean (`val_ppl` in the record; each seed's in `per_seed`). A saved
    search of another grid or tuning seed starts over."""
    path = root / SEARCH_FILE
    record = json.loads(path.read_text()) if path.exists() else {}
    if record.get("grid") != grid or record.get("seed") != tuning_seed:
        record = {"grid": grid, "seed": tuning_seed, "configs": {}}
    seeds = tuning_seeds(tuning_seed)
    for config in configs:
        if config in record["configs"]:
            continue
        chosen = {c: v["lr"] for c, v in record["configs"].items()}
        per_seed = {f"{lr:g}": {str(seed): score(config, lr, chosen, seed) for seed in seeds} for lr in grid}
        scores = {key: geometric_mean(list(by_seed.values())) for key, by_seed in per_seed.items()}
        best = min(grid, key=lambda lr: scores[f"{lr:g}"])
        record["configs"][config] = {"lr": best, "val_ppl": scores}
        if len(seeds) > 1:
            record["configs"][config]["per_seed"] = per_seed
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
    seeds = tuning_seeds(tuning["seed"])
    how = (f"the validation perplexity of one run on the tuning seed {seeds[0]}" if len(seeds) == 1 else
           f"the geometric mean of the validation perplexities of runs on the tuning seeds "
           f"{', '.join(map(str, seeds))}")
    column = "val_ppl" if len(seeds) == 1 else "geometric mean val_ppl"
    lines = [f"Each configuration's learning rate was chosen from {', '.join(f'{v:g}' for v in grid)} by {how} "
             f"({what}), before the seeds ran.",
             "", "| configuration | chosen lr | " + " | ".join(f"{column} at {v:g}" for v in grid) + " |",
             "|" + "---|" * (len(grid) + 2)]
    for name, entry in tuning["configs"].items():
        lines.append(f"| {name} | {entry['lr']:g} | " + " | ".join(fmt(entry["val_ppl"].get(f"{v:g}")) for v in grid)
                     + " |")
    split = disagreements(tuning)
    if split:
        named = "; ".join(f"`{name}` ({', '.join(f'seed {seed}: {lr:g}' for seed, lr in best.items())})"
                          for name, best in split.items())
        rests, it = ("its choice rests", "it") if len(split) == 1 else ("their choices rest", "them")
        lines += ["", f"The tuning seeds disagree on the best rate for {named}: {rests} on the mean of seeds that "
                  f"point different ways, so another tuning seed could change {it}."]
    return lines


def disagreements(tuning: dict) -> dict[str, dict[str, float]]:
    """{config: {tuning seed: its best learning rate}} for the configurations whose tuning seeds (several, `per_seed`)
    do not agree on the best grid value."""
    out = {}
    for name, entry in tuning["configs"].items():
        per_seed = entry.get("per_seed")
        if not per_seed:
            continue
        seeds = list(next(iter(per_seed.values())))
        best = {seed: float(min(per_seed, key=lambda lr: per_seed[lr][seed])) for seed in seeds}
        if len(set(best.values())) > 1:
            out[name] = best
    return out


def edge_choices(grid: list[float], chosen: dict[str, float]) -> list[str]:
    """The configurations whose chosen learning rate is the grid's smallest or largest: the best may lie beyond it."""
    return [name for name, lr in chosen.items() if lr in (min(grid), max(grid))]
