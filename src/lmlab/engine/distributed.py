"""Distributed setup for the one training loop: DDP under torchrun (NCCL on GPU, gloo on CPU).

Single-process runs need nothing: every helper here degrades to the obvious single-process answer.
Only rank 0 writes files; other ranks compute the same cells in lock step.

The device is the process's own GPU where CUDA is available (one GPU per process under torchrun: NCCL cannot share
one between processes, so more processes than GPUs is a ConfigError before anything starts), else the CPU.
`LMLAB_DEVICE=cpu` keeps a run on the CPU (gloo for several processes) on a machine with GPUs.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from datetime import timedelta

import torch
import torch.distributed as dist

from lmlab.errors import ConfigError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


DEVICE_VARIABLE = "LMLAB_DEVICE"


def device_choice() -> str:
    """`LMLAB_DEVICE`: `auto` (unset: the GPU where CUDA is available, else the CPU), `cpu` or `cuda`."""
    choice = os.environ.get(DEVICE_VARIABLE, "").strip().lower() or "auto"
    if choice not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"{DEVICE_VARIABLE}={os.environ[DEVICE_VARIABLE]!r} is not one of auto, cpu, cuda")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{DEVICE_VARIABLE}=cuda, but torch sees no CUDA device (torch {torch.__version__}); "
                          f"unset it to run on the CPU")
    return choice


def uses_gpu() -> bool:
    """Whether this process computes on a CUDA GPU (module doc)."""
    return device_choice() != "cpu" and torch.cuda.is_available()


def device() -> torch.device:
    if uses_gpu():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def check_gpus(processes: int) -> None:
    """`processes` processes on this machine need a GPU each when they run on GPUs (NCCL refuses two processes on
    one GPU): a ConfigError naming the ways out when there are fewer."""
    if processes <= 1 or not uses_gpu():
        return
    gpus = torch.cuda.device_count()
    if processes > gpus:
        raise ConfigError(f"{processes} processes need {processes} GPUs (one each), but {gpus} "
                          f"{'is' if gpus == 1 else 'are'} visible: use --nproc {gpus} (or --nproc auto), or "
                          f"{DEVICE_VARIABLE}=cpu to run {processes} processes on the CPU (gloo)")


def init_from_env() -> bool:
    """Join the process group torchrun describes in the environment (no-op when not under torchrun)."""
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_distributed()
    check_gpus(int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])))
    gpu = uses_gpu()
    if gpu:
        torch.cuda.set_device(device())
    dist.init_process_group(backend="nccl" if gpu else "gloo", timeout=timedelta(minutes=60))
    return True


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over ranks (a copy; the input is left untouched)."""
    if not is_distributed():
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def broadcast_object(obj):
    """Rank 0's object on every rank."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_objects(obj) -> list:
    """Every rank's object, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def split_batch(batch_size: int, world: int | None = None) -> int:
    """Each process's share of a global batch of `batch_size` examples (`train.batch_size` is global, so 1 and N
    processes train on the same examples per step); a batch that does not split evenly is a ConfigError."""
    world = world_size() if world is None else world
    if batch_size % world:
        raise ConfigError(f"train.batch_size = {batch_size} is the global batch, split evenly across the {world} "
                          f"processes: use a multiple of {world} (e.g. {max(world, batch_size // world * world)})")
    return batch_size // world


def resolve_nproc(value: str | int) -> int:
    """`--nproc N` (on GPUs: at most one process per visible GPU, see `check_gpus`; on the CPU: at most one per
    core this process may use); `--nproc auto`: $NUM_GPUS, else the number of visible GPUs, else 1."""
    text = str(value).strip()
    if isinstance(value, int) or text.lstrip("+-").isdigit():
        n = int(text)
        if n < 1:
            raise ConfigError(f"--nproc must be a positive integer or 'auto', got {value!r}")
        check_gpus(n)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if n > cores and not uses_gpu():  # gloo on the CPU: each process needs a core of its own to progress
            raise ConfigError(f"--nproc {n} starts {n} processes on the CPU, but this process may use {cores} "
                              f"core(s): use --nproc {cores} or fewer")
        return n
    if text != "auto":
        raise ConfigError(f"--nproc must be a positive integer or 'auto', got {value!r}")
    env = os.environ.get("NUM_GPUS")
    if env and env.isdigit() and int(env) > 0:
        check_gpus(int(env))
        return int(env)
    if uses_gpu():
        return torch.cuda.device_count()
    if device_choice() == "cpu":
        return 1
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=False)
            gpus = [line for line in out.stdout.splitlines() if line.startswith("GPU")]
            if gpus:
                return len(gpus)
        except (OSError, subprocess.SubprocessError):
            pass
    return 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
