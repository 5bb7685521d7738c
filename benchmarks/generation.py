"""Greedy generation (`lmlab.eval.generation.greedy_generate`, used by retrieval and LatentWire) with the prompt's
last logits only (transformers' `logits_to_keep`) against the full [B, T, vocab] prompt logits.

    .venv/bin/python benchmarks/generation.py [--threads N]

Both sides in this process on the same model and prompts, warm-up first, then interleaved rounds; prints the
median ms of each and the median over rounds of last-only / full. The full side is the same model behind a
wrapper whose forward does not take `logits_to_keep`, so greedy_generate cannot ask for it. Shapes: the `default`
HyLoRADA preset's retrieval (Llama width 128, 2 layers, vocab 1024, 16 prompts of 500 tokens, 3 new tokens) and a
4k-vocabulary Llama of width 128 and 4 layers at the same batch.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmlab.benchsuite.suite import interleaved, paired_ratio
from lmlab.eval.generation import greedy_generate

SHAPES = {"default preset (vocab 1024, 2 layers)": (1024, 2), "vocab 4096, 4 layers": (4096, 4)}
BATCH, PROMPT, NEW = 16, 500, 3


class FullLogits(torch.nn.Module):
    """The model behind a forward without `logits_to_keep`: every prompt position's logits are computed."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
                past_key_values=None, use_cache=True):
        return self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                          position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache)


def cases(vocab: int, layers: int) -> dict:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256,
                                         num_hidden_layers=layers, num_attention_heads=4,
                                         max_position_embeddings=1024)).eval()
    ids = torch.randint(1, vocab, (BATCH, PROMPT), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    full = FullLogits(model)
    runs = {"last": lambda: greedy_generate(model, mask, NEW, input_ids=ids),
            "full": lambda: greedy_generate(full, mask, NEW, input_ids=ids)}
    assert torch.equal(runs["last"](), runs["full"]())  # the same tokens
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads; {BATCH} prompts of {PROMPT} tokens, {NEW} new tokens; medians of 15 interleaved "
          "rounds")
    for name, shape in SHAPES.items():
        times = interleaved(cases(*shape), 2, 15, torch.device("cpu"))
        print(f"{name}: last logits only {1e3 * statistics.median(times['last']):.1f} ms, full prompt logits "
              f"{1e3 * statistics.median(times['full']):.1f} ms, last / full "
              f"{paired_ratio(times['last'], times['full']):.3f}")


if __name__ == "__main__":
    main()
