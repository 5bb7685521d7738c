"""lmlab's rank-r adapter kernel against the same adapter step on torch's matmuls, at the bench's Llama shapes.

    .venv/bin/python benchmarks/lowrank_kernel.py [--threads N]

One adapted projection (r = 8, 2048 tokens = the bench's batch of 4 x 512, no dropout: the merged-weight path
lmlab trains on) forward + backward, with the kernel and with `LMLAB_CPU_KERNELS=0` (torch's matmuls), on the
same tensors in this process: warm-up first, then interleaved rounds; prints the median ms of each side and of the
frozen projection alone (what the floor pays), and medians over rounds of kernel / torch and of each side / the
projection (what the adapter adds to the projection it wraps).
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
from torch import nn

from lmlab.benchsuite.suite import interleaved, paired_ratio
from lmlab.hylorada import HyLoRADAConfig
from lmlab.hylorada.layers import HyLoRADALinear
from lmlab.kernels import lowrank
from lmlab.kernels.build import DISABLE_ENV

SHAPES = {"q/k/v/o 256 -> 256": (256, 256), "gate/up 256 -> 672": (256, 672), "down 672 -> 256": (672, 256)}
TOKENS, RANK = 2048, 8


def cases(in_features: int, out_features: int) -> dict:
    torch.manual_seed(0)
    base = nn.Linear(in_features, out_features, bias=False).requires_grad_(False)
    config = HyLoRADAConfig(r=RANK, alpha=2 * RANK, dropout=0.0, position_bias=False, landmarks="none",
                            target_modules=["x"])
    adapter = HyLoRADALinear(base, config)
    nn.init.normal_(adapter.lora_B, std=0.02)
    x = torch.randn(TOKENS, in_features, requires_grad=True)
    grad_y = torch.randn(TOKENS, out_features)

    def step(kernel: bool):
        def run():
            os.environ[DISABLE_ENV] = "1" if kernel else "0"
            adapter(x).backward(grad_y)
            x.grad = adapter.lora_A.grad = adapter.lora_B.grad = None
        return run

    def projection():
        base(x).backward(grad_y)
        x.grad = None

    return {"kernel": step(True), "torch": step(False), "projection": projection}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not lowrank.applies(torch.zeros(1), rank=RANK):
        raise SystemExit("the CPU low-rank kernel is not available here (no C compiler, or LMLAB_CPU_KERNELS=0)")
    before = os.environ.get(DISABLE_ENV)
    print(f"{args.threads} threads; {TOKENS} tokens, r = {RANK}; forward + backward, medians of 31 interleaved rounds")
    try:
        for name, shape in SHAPES.items():
            times = interleaved(cases(*shape), 5, 31, torch.device("cpu"))
            ms = {side: 1e3 * statistics.median(t) for side, t in times.items()}
            over = {side: paired_ratio(times[side], times["projection"]) for side in ("kernel", "torch")}
            print(f"{name}: kernel {ms['kernel']:.2f} ms, torch {ms['torch']:.2f} ms, projection alone "
                  f"{ms['projection']:.2f} ms; kernel / torch {paired_ratio(times['kernel'], times['torch']):.3f}; "
                  f"/ projection: kernel {over['kernel']:.3f}, torch {over['torch']:.3f}")
    finally:
        if before is None:
            os.environ.pop(DISABLE_ENV, None)
        else:
            os.environ[DISABLE_ENV] = before


if __name__ == "__main__":
    main()
