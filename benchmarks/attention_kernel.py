"""lmlab's CPU attention kernel against torch's SDPA, forward + backward, at the shapes lmlab runs it on.

    .venv/bin/python benchmarks/attention_kernel.py [--threads N]

Both sides in this process on the same tensors, warm-up first, then interleaved rounds; prints the median ms of
each and the median over rounds of kernel / SDPA. Shapes: HF heads [B, H, T, D] = [4, 4, 512, 64] (the bench's
tiny GPT-2 / Llama), MU's block heads [16, 16, 128, 4] and the dense baseline's heads [16, 3, 128, 22].
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from lmlab.benchsuite.suite import interleaved, paired_ratio
from lmlab.kernels import hf_attention_forward, kernel_available

SHAPES = {"hf [4, 4, 512, 64]": (4, 4, 512, 64), "mu block [16, 16, 128, 4]": (16, 16, 128, 4),
          "dense [16, 3, 128, 22]": (16, 3, 128, 22)}


class _Causal(torch.nn.Module):
    is_causal = True


def cases(B: int, H: int, T: int, D: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=generator).requires_grad_() for _ in range(3))
    grad_out = torch.randn(B, T, H, D, generator=generator)

    def kernel():
        hf_attention_forward(_Causal(), q, k, v, None)[0].backward(grad_out)

    def sdpa():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).backward(grad_out)

    return {"kernel": kernel, "sdpa": sdpa}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not kernel_available():
        raise SystemExit("the CPU attention kernel is not available here (no C compiler, or LMLAB_CPU_KERNELS=0)")
    print(f"{args.threads} threads; forward + backward, medians of 21 interleaved rounds")
    for name, shape in SHAPES.items():
        times = interleaved(cases(*shape), 3, 21, torch.device("cpu"))
        ratio = paired_ratio(times["kernel"], times["sdpa"])
        print(f"{name}: kernel {1e3 * statistics.median(times['kernel']):.2f} ms, sdpa "
              f"{1e3 * statistics.median(times['sdpa']):.2f} ms, kernel / sdpa {ratio:.3f}")


if __name__ == "__main__":
    main()
