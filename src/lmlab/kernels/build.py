"""Building and loading lmlab's C kernels: compiled on first use with the machine's C compiler (cc, gcc or $CC,
with OpenMP) into the lmlab cache (`LMLAB_CACHE`, by default ~/.cache/lmlab), once per source, compiler and CPU,
and loaded with ctypes. `LMLAB_CPU_KERNELS=0` turns every kernel off (torch's own ops run instead).

Threads: a kernel library needs libgomp.so.1, and the dynamic loader hands it the one torch has already loaded
(Linux builds of torch ship libgomp under that name), so kernels and torch's ops share one OpenMP runtime and its
thread pool; each call asks for its share of `torch.get_num_threads()` (see attention.py and lowrank.py). How idle
threads wait is that runtime's setting, read once when torch loads it: `lmlab run` and `lmlab eval` choose
it (and the thread count) from what else is running when they start - see lmlab.cpu_share.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path

FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC")
DISABLE_ENV = "LMLAB_CPU_KERNELS"


def disabled() -> bool:
    """Whether the user turned the kernels off (`LMLAB_CPU_KERNELS=0`)."""
    return os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off")


@functools.cache
def load(name: str, what: str) -> ctypes.CDLL | None:
    """The compiled `name`.c next to this file, or None with one warning (naming `what` falls back to torch) if it
    cannot be built or loaded here."""
    try:
        return ctypes.CDLL(str(build(Path(__file__).with_name(f"{name}.c"))))
    except (OSError, subprocess.SubprocessError) as exc:
        warnings.warn(f"lmlab: the CPU kernel {name}.c could not be built or loaded ({exc}); {what}. To build it, "
                      f"install a C compiler with OpenMP (e.g. gcc) or point CC at one; to skip it without this "
                      f"warning, set {DISABLE_ENV}=0.", RuntimeWarning, stacklevel=4)
        return None


def build(source: Path) -> Path:
    """The shared library of `source` in the cache, compiled if it is not there yet."""
    from lmlab.fileio import atomic_path, cache_root

    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise OSError("no C compiler found (cc, gcc or $CC)")
    # -march=native: the library is only valid on this kind of CPU, so the CPU is part of its name.
    key = hashlib.sha256(
        "\0".join([source.read_text(), compiler, *FLAGS, platform.machine(), _cpu_flags()]).encode()
    ).hexdigest()[:16]
    target = cache_root() / "kernels" / f"{source.stem}-{key}.so"
    if not target.exists():
        with atomic_path(target) as tmp:  # concurrent builders (test workers) each rename a whole file into place
            result = subprocess.run([compiler, *FLAGS, str(source), "-o", str(tmp)], capture_output=True,
                                    text=True, timeout=120)
            if result.returncode != 0:
                last = (result.stderr.strip().splitlines() or ["no output"])[-1]
                raise OSError(f"{compiler} exited with {result.returncode}: {last}")
    return target


def _cpu_flags() -> str:
    """The first CPU's model name and instruction-set flags, as /proc/cpuinfo lists them (Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return platform.processor()
    return "\n".join(line for line in text.splitlines() if line.startswith(("model name", "flags", "Features")))
