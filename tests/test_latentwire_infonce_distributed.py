"""InfoNCE negatives gathered across ranks (two gloo processes on CPU) match the single-process batch."""

import json

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lmlab.latentwire.losses import info_nce

ROWS = (3, 2)  # uneven per-rank batches: the gather must pad and trim
WIDTH = 8


def full_batch():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(sum(ROWS), WIDTH, generator=generator), torch.randn(sum(ROWS), WIDTH, generator=generator)


def worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(ROWS))
    try:
        soft, question = full_batch()
        lo = sum(ROWS[:rank])
        local_soft = soft[lo: lo + ROWS[rank]].clone().requires_grad_(True)
        losses = info_nce(local_soft, question[lo: lo + ROWS[rank]], temperature=0.07)
        losses.sum().backward()
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"losses": losses.tolist(), "grad": local_soft.grad.tolist()}, f)
    finally:
        dist.destroy_process_group()


def test_info_nce_gathers_negatives_across_ranks_with_local_gradient(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=len(ROWS), join=True)
    soft, question = full_batch()
    reference = info_nce(soft, question, temperature=0.07)  # one process holding the whole batch
    for rank, n in enumerate(ROWS):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        lo = sum(ROWS[:rank])
        torch.testing.assert_close(torch.tensor(got["losses"]), reference[lo: lo + n].detach())
        # The gradient reaches this rank's rows through its own losses; other ranks' rows are constants.
        local = soft[lo: lo + n].clone().requires_grad_(True)
        mixed = torch.cat([soft[:lo], local, soft[lo + n:]])
        info_nce(mixed, question, temperature=0.07)[lo: lo + n].sum().backward()
        torch.testing.assert_close(torch.tensor(got["grad"]), local.grad)
        assert local.grad.abs().sum() > 0
