#!/usr/bin/env bash
# Install PyTorch into the given Python environment, choosing the build for this machine:
# - torch already importable: nothing to do;
# - a working NVIDIA GPU: the default (CUDA) build from PyPI, unpinned;
# - otherwise the CPU-only build (pytorch.org's CPU index or a local wheel), which avoids
#   downloading gigabytes of CUDA libraries that a CPU machine cannot use.
set -euo pipefail
PY="$1"
if "$PY" -c "import torch" 2>/dev/null; then
    exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "install_torch: GPU found, installing the CUDA build of torch"
    "$PY" -m pip install torch
else
    echo "install_torch: no GPU found, installing the CPU build of torch"
    PIP_RETRIES=0 "$PY" -m pip install "torch==${LMLAB_CPU_TORCH:-2.13.0}" \
        --extra-index-url https://download.pytorch.org/whl/cpu
fi
