#!/usr/bin/env bash
# The GPU check of issue 20 in one call: the test suite on a machine with an NVIDIA GPU, then `lmlab bench --gpu`.
#
#   scripts/gpu_check.sh fetch          # here, with pip and a network: wheels of what a bare GPU image lacks -> .whl/
#   scripts/gpu_check.sh [all|tests|bench]   # on the GPU machine (default: all); outputs under $OUT when set
#
# The GPU machine needs no network: it runs lmlab from this checkout (PYTHONPATH=src, an `lmlab` command on PATH
# that runs `python -m lmlab.cli`), with the packages of its own Python ($PYTHON, default python3) plus any wheels
# in .whl/ (installed into /tmp/site). Logs and results: $OUT/tests.log, $OUT/bench.log and the benchmark's
# <date>-gpu.json / .md (in $OUT, else benchmarks/results). Time limits: TEST_TIMEOUT (default 300 s) for the
# suite, BENCH_TIMEOUT (default 240 s) for the benchmark; JOBS pytest workers (default 8). Extra arguments after the
# mode go to `lmlab bench --gpu` (e.g. --lengths 32k,64k or --quick).
#
# On the lent device machine (run from this repository's root, with `carry`): carry .whl (made by `fetch`, kept out
# of git) and .cache/test-models (the tiny pretrained bases the tests share: built here by `make test`; without them
# the GPU machine pretrains them on one core inside the suite's time limit), and ask for the H200 where the 131,072-
# token probe matters (about 85-90 GiB at its peak, more than an H100 holds):
#   run(command="OUT=$OUT scripts/gpu_check.sh", carry=[".whl", ".cache/test-models"], kind="nvidia-h200")
# Tests of optional extras the image lacks (lm-eval, trackers, submitit) are skipped, not failed
# (LMLAB_TEST_SKIP_MISSING_EXTRAS=1; `make test` installs them and runs those tests).
set -u
cd "$(dirname "$0")/.."
mode="${1:-all}"
[ $# -gt 0 ] && shift
case "$mode" in all|tests|bench|fetch) ;; *) echo "usage: scripts/gpu_check.sh [all|tests|bench|fetch] [lmlab bench options]" >&2; exit 2;; esac
PYTHON="${PYTHON:-python3}"
OUT_DIR="${OUT:-}"
[ -n "$OUT_DIR" ] && mkdir -p "$OUT_DIR"
# what lmlab needs beyond a PyTorch + transformers + peft image (versions this checkout is tested with)
WHEELS=(pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 liger-kernel==0.8.5)

if [ "$mode" = fetch ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    platforms=()
    for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
    exec "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
fi

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_check: installing .whl/ failed" >&2; exit 1; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p /tmp/lmlab-bin
printf '#!/bin/sh\nexec "%s" -m lmlab.cli "$@"\n' "$(command -v "$PYTHON")" > /tmp/lmlab-bin/lmlab
chmod +x /tmp/lmlab-bin/lmlab
export PATH="/tmp/lmlab-bin:$PATH"

log() { if [ -n "$OUT_DIR" ]; then tee -a "$OUT_DIR/$1"; else cat; fi; }
"$PYTHON" - <<'EOF' 2>&1 | log tests.log
import importlib, torch
# imported, not only found: a wheel built for another Python or a broken dependency fails here, in one line, rather
# than as collection errors that stop the whole suite
missing = []
for m in ("pydantic", "transformers", "peft", "datasets", "yaml", "scipy", "psutil", "tqdm", "safetensors", "pytest",
          "xdist", "matplotlib", "lmlab.cli"):
    try:
        importlib.import_module(m)
    except Exception as exc:  # noqa: BLE001 - any failure to import is what this check reports
        missing.append(f"{m} ({type(exc).__name__}: {exc})")
versions = {m: getattr(importlib.import_module(m), "__version__", "?") for m in ("transformers", "peft")
            if not any(x.startswith(m) for x in missing)}
try:
    import liger_kernel.transformers.monkey_patch  # noqa: F401 - train.kernels=liger's tests need it
    versions["liger-kernel"] = "ok"
except Exception as exc:  # noqa: BLE001
    versions["liger-kernel"] = f"unavailable ({type(exc).__name__}: {exc})"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPUs: "
      f"{[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}, {versions}")
if missing:
    raise SystemExit(f"gpu_check: cannot import {missing}: run `scripts/gpu_check.sh fetch` where pip has a network, "
                     "and carry .whl")
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1

status=0
if [ "$mode" = all ] || [ "$mode" = tests ]; then
    set -o pipefail
    # -rfE: failures and errors named at the end; --durations: where the time went. SIGINT at the time limit: pytest
    # stops as on Ctrl-C and still prints its summary (and writes junit.xml), where SIGTERM would lose both.
    junit=()
    [ -n "$OUT_DIR" ] && junit=(--junitxml "$OUT_DIR/junit.xml")
    LMLAB_TEST_SKIP_MISSING_EXTRAS=1 timeout -s INT -k 30 "${TEST_TIMEOUT:-300}" "$PYTHON" -m pytest -q -rfE \
        --durations=15 -p no:cacheprovider -n "${JOBS:-8}" --dist loadgroup "${junit[@]}" \
        2>&1 | log tests.log
    status=$?
    echo "gpu_check: tests exit code $status" | log tests.log
fi
if [ "$mode" = all ] || [ "$mode" = bench ]; then
    set -o pipefail
    bench_out=()
    [ -n "$OUT_DIR" ] && bench_out=(--out "$OUT_DIR")
    timeout -s INT -k 30 "${BENCH_TIMEOUT:-240}" "$PYTHON" -m lmlab.cli bench --gpu "${bench_out[@]}" "$@" 2>&1 | log bench.log
    bench_status=$?
    echo "gpu_check: bench exit code $bench_status" | log bench.log
    [ "$status" -eq 0 ] && status=$bench_status
fi
exit "$status"
