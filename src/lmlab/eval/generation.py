"""Batched greedy generation with a KV cache for Hugging Face causal LMs (left-padded prompts).

One implementation serves every greedy use: retrieval by depth, GSM8K answers, LatentWire's bridged
prompts (which start from `inputs_embeds`). Positions come from the attention mask, so left padding
never shifts a real token's position.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lmlab.models.hf import forward_takes, kv_cache


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token counted over real tokens only ([B, T] -> [B, T]; padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    *,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    stop_strings: list[str] | tuple[str, ...] = (),
    tokenizer=None,
) -> torch.Tensor:
    """Greedy continuation of a left-padded batch. Returns the new tokens [B, n] (n <= max_new_tokens).

    Give either `input_ids` [B, T] or `inputs_embeds` [B, T, d] with their `attention_mask` [B, T]
    (1 = real token; padding on the left). A row stops at `eos_token_id` or when its decoded text
    contains one of `stop_strings` (needs `tokenizer`); finished rows are filled with `pad_token_id`.
    The stop text itself stays in the output: callers cut at it.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids or inputs_embeds")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer")
    was_training = model.training
    model.eval()
    mask = attention_mask.long()
    batch = mask.shape[0]
    device = mask.device
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    new_tokens: list[torch.Tensor] = []
    step_inputs = {"input_ids": input_ids} if input_ids is not None else {"inputs_embeds": inputs_embeds}
    position_ids = positions_from_mask(mask)
    past = None
    tail = max((len(s) for s in stop_strings), default=0) + 8  # tokens to decode when looking for a stop
    # the prompt's step computes the logits of its last position only where the forward takes `logits_to_keep`
    # (transformers' causal LMs), not [B, T, vocab] (8 GB in float32 for one 16k-token prompt over a 128k vocabulary);
    # the cache goes by the name the forward declares (`cache` from transformers 5.25 on, `past_key_values` before)
    keep = {"logits_to_keep": 1} if forward_takes(type(model), "logits_to_keep") else {}
    cache_name = "cache" if forward_takes(type(model), "cache") else "past_key_values"
    try:
        for _ in range(max_new_tokens):
            with warnings.catch_warnings():
                # a model whose forward takes the cache only through **kwargs (e.g. peft's wrapper) gets the old
                # name, which transformers 5 accepts with a FutureWarning on every first call site
                warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)
                out = model(**step_inputs, attention_mask=mask, position_ids=position_ids, use_cache=True,
                            **{cache_name: past}, **keep)
            past = kv_cache(out)
            next_token = out.logits[:, -1, :].argmax(-1)  # [B]
            next_token = torch.where(done, torch.full_like(next_token, pad_token_id), next_token)
            new_tokens.append(next_token)
            if eos_token_id is not None:
                done |= next_token == eos_token_id
            if stop_strings:
                generated = torch.stack(new_tokens, 1)
                for row in (~done).nonzero().flatten().tolist():
                    text = tokenizer.decode(generated[row, -tail:], skip_special_tokens=True)
                    if any(s in text for s in stop_strings):
                        done[row] = True
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=device)], dim=1)
            position_ids = position_ids[:, -1:] + 1
            step_inputs = {"input_ids": next_token[:, None]}
    finally:
        model.train(was_training)
    if not new_tokens:
        return torch.zeros(batch, 0, dtype=torch.long, device=device)
    return torch.stack(new_tokens, dim=1)


def left_pad(sequences: list[list[int]], pad_token_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (input_ids [B, T], attention_mask [B, T]) padded on the left."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            ids[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq):] = 1
    return ids.to(device), mask.to(device)
