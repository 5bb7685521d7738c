"""`lmlab bench`: the side-by-side performance benchmarks of `benchmarks/suite.py` (a source checkout's folder).

The suite runs in a fresh process with `LMLAB_BENCH_THREADS` torch threads (default: all cores), the same on
both sides of every comparison, and OpenMP threads that wait passively (`OMP_WAIT_POLICY=PASSIVE` unless set):
other jobs on the machine then slow both sides alike instead of stalling every parallel region.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from lmlab.errors import LmlabError

SUITE = Path(__file__).resolve().parents[2] / "benchmarks" / "suite.py"


def load_suite() -> ModuleType:
    """The benchmark suite module (benchmarks/ is not part of the installed package)."""
    _check_checkout()
    name = "lmlab_benchmark_suite"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SUITE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules[name]


def run_benchmarks(quick: bool = False, only: list[str] | None = None, out: str | None = None) -> Path:
    """Run the benchmarks (all, or the names in `only`); returns the JSON results file (a markdown table beside it)."""
    names = load_suite().BENCHMARKS
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise LmlabError(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    threads = os.environ.get("LMLAB_BENCH_THREADS", str(os.cpu_count() or 1))
    if not threads.isdigit() or int(threads) < 1:
        raise LmlabError(f"LMLAB_BENCH_THREADS must be a positive integer, got {threads!r}")
    options = {"quick": quick, "only": only or None, "threads": int(threads),
               "out": str(Path(out).resolve() if out else SUITE.parent / "results")}
    env = {**os.environ, "OMP_NUM_THREADS": threads, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    done = subprocess.run([sys.executable, str(SUITE), "run", json.dumps(options)], stdout=subprocess.PIPE,
                          text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the benchmark suite failed (exit code {done.returncode}); its error is above")
    return Path(done.stdout.strip().splitlines()[-1])


def _check_checkout() -> None:
    if not SUITE.exists():
        raise LmlabError(f"lmlab bench runs benchmarks/suite.py of a source checkout, which is not at {SUITE.parent}: "
                         "run it from a clone of the repository (pip install -e .)")
