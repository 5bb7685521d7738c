"""`lmlab bench`: the side-by-side performance benchmarks of `lmlab.benchsuite.suite` (CPU) and
`lmlab.benchsuite.gpu` (`--gpu`, the default where CUDA is available).

The suite runs in a fresh process (`python -m lmlab.benchsuite.suite run OPTIONS`) with `LMLAB_BENCH_THREADS` torch
threads (default: all cores), the same on both sides of every comparison, and OpenMP threads that wait passively
(`OMP_WAIT_POLICY=PASSIVE` unless set): other jobs on the machine then slow both sides alike instead of stalling
every parallel region. The GPU benchmarks run in a fresh process too (`python -m lmlab.benchsuite.gpu run OPTIONS`).
Results go to the checkout's `benchmarks/results` unless told otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from lmlab.errors import LmlabError

SUITE_MODULE = "lmlab.benchsuite.suite"


def run_benchmarks(quick: bool = False, only: list[str] | None = None, out: str | None = None,
                   gpu: bool | None = None, lengths: str | None = None) -> Path:
    """Run the benchmarks (all, or the names in `only`); returns the JSON results file (a markdown table beside it).

    `gpu`: the GPU benchmarks (`only` then names their models, `lengths` the long-context probe's sequence lengths);
    None: they run where CUDA is available unless `only` names a CPU benchmark. True without CUDA is an LmlabError."""
    from lmlab.benchsuite import gpu as gpu_bench
    from lmlab.benchsuite import results_dir
    from lmlab.benchsuite.suite import BENCHMARKS

    if only is not None and not only:  # `--only` with nothing after it: not "everything"
        raise LmlabError(f"--only names no benchmark: give one or more of {', '.join(BENCHMARKS)} (with --gpu: "
                         f"{', '.join(gpu_bench.MODELS)}), or drop --only to run them all")
    if gpu is None:  # LMLAB_DEVICE=cpu: the CPU benchmarks also on a machine with a GPU
        from lmlab.engine import distributed as D

        gpu = D.uses_gpu() and set(only or ()) <= set(gpu_bench.MODELS)
    if gpu:
        gpu_bench.require_cuda()
        options = {**gpu_bench.options(quick, lengths, only), "out": str(Path(out).resolve() if out else results_dir())}
        _check_out(Path(options["out"]))  # after the options are checked, before minutes of measuring
        return _child([sys.executable, "-m", gpu_bench.__name__, "run", json.dumps(options)], dict(os.environ))
    if lengths is not None:
        raise LmlabError("--lengths sets the long-context probe of the GPU benchmarks: use it with --gpu")

    unknown = sorted(set(only or ()) - set(BENCHMARKS))
    if unknown:
        raise LmlabError(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    threads = os.environ.get("LMLAB_BENCH_THREADS", str(os.cpu_count() or 1))
    if not threads.isdigit() or int(threads) < 1:
        raise LmlabError(f"LMLAB_BENCH_THREADS must be a positive integer, got {threads!r}")
    options = {"quick": quick, "only": only or None, "threads": int(threads),
               "out": str(Path(out).resolve() if out else results_dir())}
    _check_out(Path(options["out"]))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    return _child([sys.executable, "-m", SUITE_MODULE, "run", json.dumps(options)], env)


def _check_out(out: Path) -> None:
    """The results directory can be made and written, before minutes of benchmarks are measured into it."""
    from lmlab.fileio import probe_writable

    try:
        probe_writable(out, make=True)
    except OSError as exc:
        raise LmlabError(f"cannot write benchmark results to {out}: {exc.strerror or exc}; choose another --out "
                         "(a directory)") from None


def _child(command: list[str], env: dict) -> Path:
    """`python -m MODULE run OPTIONS` in a fresh process; the results path it prints last."""
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the benchmark suite failed (exit code {done.returncode}); its error is above")
    return Path(done.stdout.strip().splitlines()[-1])
