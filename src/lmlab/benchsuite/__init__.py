"""The benchmark suite of `lmlab bench` (`suite`) and the busy-CPU smoke benchmark (`busy_cpu`).

Recipes, not components: they time lmlab's training steps and studies against peft and plain PyTorch. The scripts
in a checkout's `benchmarks/` folder (`benchmarks/suite.py`, `benchmarks/busy_cpu.py`) run these modules.
"""

from __future__ import annotations

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
