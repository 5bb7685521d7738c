"""Worker for test_engine_train.py: trains a tiny model with the one loop, on 1 or N processes.

Run as `python tests/ddp_worker.py OUT.json BATCH ACCUM` or under `torchrun --nproc_per_node 2` (BATCH is
train.batch_size: the global batch, split across the processes).
Writes the per-step losses and a checksum of the final trainable weights (rank 0). The tests run it with
LMLAB_DEVICE=cpu: float32 on the CPU and gloo, also on a machine with a GPU.
"""

import json
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmlab.engine import distributed as D
from lmlab.engine.train import TrainConfig, train


def main() -> None:
    out_path, batch_size, accum = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    D.init_from_env()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0,
    ))
    gen = torch.Generator().manual_seed(1)
    # 21 examples of varied length: padding inside micro-batches, a partial last global batch.
    data = [{"input_ids": torch.randint(3, 97, (int(torch.randint(5, 30, (1,), generator=gen)),),
                                        generator=gen).tolist()} for _ in range(21)]
    cfg = TrainConfig(epochs=2, batch_size=batch_size, grad_accum=accum, lr=3e-3, warmup_steps=1, log_every=1)
    result = train(model, data, cfg, seed=7, progress=False)
    losses = [h["loss"] for h in result.history if h["kind"] == "train"]
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    if D.is_main():
        with open(out_path, "w") as f:
            json.dump({"losses": losses, "checksum": checksum, "examples": result.examples,
                       "steps": result.steps}, f)
    D.shutdown()


if __name__ == "__main__":
    main()
