"""The benchmark suite of `lmlab bench` (`suite`) and the busy-CPU smoke benchmark (`busy_cpu`).

Recipes, not components: they time lmlab's training steps and studies against peft and plain PyTorch. The scripts
in a checkout's `benchmarks/` folder (`benchmarks/suite.py`, `benchmarks/busy_cpu.py`) run these modules.
"""

from __future__ import annotations

import json
from pathlib import Path


def source_checkout() -> Path | None:
    """The root of the source checkout this package runs from (src layout with a `benchmarks/` folder), or None
    when lmlab is installed from a wheel."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "benchmarks").is_dir() and (root / "src" / "lmlab").is_dir() else None


def results_dir() -> Path:
    """Where results go unless told otherwise: the checkout's `benchmarks/results`, else `benchmarks/results` under
    the current directory."""
    return (source_checkout() or Path.cwd()) / "benchmarks" / "results"


def write_results(out: Path, started, suffix: str, results: dict, text: str) -> Path:
    """`<out>/<date><suffix>.json` and `.md`; never over an earlier run of the same day (then `<date>T<time>`)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{started.date().isoformat()}{suffix}.json"
    if path.exists():
        path = out / f"{started.date().isoformat()}T{started:%H%M%S}{suffix}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    path.with_suffix(".md").write_text(text)
    return path
