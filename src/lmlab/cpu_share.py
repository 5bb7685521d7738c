"""Sharing the CPU with other processes: torch's thread settings chosen from what else is running when a command
starts (before torch is imported: its OpenMP runtime reads them once).

OpenMP threads wait for work between parallel regions. By default (GNU OpenMP, which Linux builds of torch use)
they spin for a few milliseconds first, which makes back-to-back small ops fast on an idle machine - and, on a
machine whose cores another process keeps busy, makes every parallel region wait for a thread that the scheduler
has parked behind a spinning one. Measured on 2 cores (`lmlab run mu --preset smoke`, benchmarks/busy_cpu.py):

| setting                           | idle    | another process runs torch matmuls |
|-----------------------------------|---------|------------------------------------|
| `--threads 1`                     | 15.8 s  | 22.0 s                             |
| 2 threads, OpenMP default spin    | 14.2 s  | over 74 s                          |
| 2 threads, `OMP_WAIT_POLICY=PASSIVE` | 25.9 s | 25.0 s                           |

No one setting is right for both, so `lmlab run` and `lmlab eval` look first: when other processes are running
(`/proc/loadavg`'s count of runnable tasks, sampled a few times), torch gets one thread per core they leave free
(at least one) and its idle threads sleep (`OMP_WAIT_POLICY=PASSIVE`); on an idle machine nothing changes. A user's
own `--threads`, `OMP_NUM_THREADS`, `OMP_WAIT_POLICY` or `GOMP_SPINCOUNT` always wins; `LMLAB_SHARE_CPU=0` turns the
check off. The choice is made once, when the command starts: load that arrives later is not followed.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import MutableMapping
from pathlib import Path

SAMPLES = 7
NOTE: list[str] = []  # what share_cpu chose, for the run to say once it starts computing
INTERVAL_S = 0.01
WAIT_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def others_running(samples: int = SAMPLES, interval: float = INTERVAL_S, loadavg: Path = Path("/proc/loadavg")
                   ) -> float | None:
    """Runnable tasks other than the reading one (the median of `samples` readings of /proc/loadavg's `r/t`
    field), or None where the file does not exist (not Linux)."""
    counts = []
    for i in range(samples):
        try:
            running = int(loadavg.read_text().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return None
        counts.append(max(0, running - 1))
        if i + 1 < samples:
            time.sleep(interval)
    return float(statistics.median(counts))


def plan(environ: MutableMapping[str, str], cores: int, others: float | None, threads_given: bool) -> dict:
    """The environment to add for a process starting with `others` runnable tasks beside it on `cores` cores,
    and the sentence that says so; {} (nothing to change) on an idle machine or where the user chose."""
    if others is None or others < 1 or environ.get("LMLAB_SHARE_CPU") == "0":
        return {}
    env = {}
    if not any(k in environ for k in WAIT_KEYS):
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    threads = max(1, cores - round(others))
    if not threads_given and "OMP_NUM_THREADS" not in environ:
        env["OMP_NUM_THREADS"] = str(threads)
    if not env:
        return {}
    parts = []
    if "OMP_NUM_THREADS" in env:
        parts.append(f"torch uses {env['OMP_NUM_THREADS']} thread(s)")
    if "OMP_WAIT_POLICY" in env:
        parts.append("idle threads sleep (OMP_WAIT_POLICY=PASSIVE)")
    return {"env": env, "message": f"{others:g} other task(s) running on {cores} core(s): {', '.join(parts)}; "
                                   "--threads or OMP_NUM_THREADS choose, LMLAB_SHARE_CPU=0 turns this off"}


def share_cpu(threads_given: bool, environ: MutableMapping[str, str] | None = None) -> str | None:
    """Apply `plan` to this process's environment before torch is imported; returns the message, or None when
    nothing changed (torch already loaded, a torchrun worker - its launcher chose - or an idle machine)."""
    import sys

    environ = os.environ if environ is None else environ
    if "torch" in sys.modules or "LOCAL_RANK" in environ or environ.get("LMLAB_SHARE_CPU") == "0":
        return None
    chosen = plan(environ, usable_cores(), others_running(), threads_given)
    if not chosen:
        return None
    environ.update(chosen["env"])
    NOTE.append(chosen["message"])
    return chosen["message"]


@contextlib.contextmanager
def torch_threads(n: int):
    """Torch on `n` intra-op threads inside; the process's own count again after (a benchmark's fixed count, the one
    thread a built-in base is pretrained on)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
