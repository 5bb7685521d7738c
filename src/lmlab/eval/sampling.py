"""Sampling-based generation for models called as `model(input_ids) -> logits` (MU and its dense baseline).

No KV cache: every step reruns the model on the last `max_seq_len` tokens. The logits processors are pure
functions over next-token logits [B, V], applied in the order: repetition penalty, temperature, top-k,
top-p. `temperature=0` means greedy (argmax after the repetition penalty).
"""

from __future__ import annotations

import torch
from torch import nn


def apply_repetition_penalty(logits: torch.Tensor, previous_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019) on every token already in `previous_ids` [B, n]: positive logits are
    divided by `penalty`, negative ones multiplied, so a repeated token always becomes less likely
    (dividing a negative logit would make it *more* likely)."""
    if penalty == 1.0 or previous_ids.numel() == 0:
        return logits
    seen = logits.gather(-1, previous_ids)
    penalised = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(-1, previous_ids, penalised)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide by `temperature` > 0 (below 1 sharpens, above 1 flattens the distribution)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 here (0 means greedy, handled by sample), got {temperature}")
    return logits / temperature


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep exactly the `top_k` highest logits per row (ties broken by torch.topk); 0 keeps all."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, logits.topk(top_k, dim=-1).indices, True)
    return logits.masked_fill(~keep, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2020): keep the smallest set of most likely tokens whose probability
    reaches `top_p`; the most likely token is always kept. `top_p >= 1` keeps all."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # probability of the strictly more likely tokens
    drop_sorted = mass_before >= top_p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


@torch.no_grad()
def sample(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
    eos_token_id: int | None = None,
) -> torch.Tensor:
    """Continue `prompt_ids` [B, T0] by up to `max_new_tokens` tokens; returns the new tokens [B, n].

    The repetition penalty looks at the prompt and the generated tokens. A row that produced
    `eos_token_id` is finished and padded with it; generation stops early when every row is finished.
    The context is cropped to the model's `config.max_seq_len` (when it has one). Seed `generator` for
    reproducible samples.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    config = getattr(model, "config", None)
    context = getattr(config, "max_seq_len", None) or prompt_ids.shape[1] + max_new_tokens
    was_training = model.training
    model.eval()
    ids = prompt_ids
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    try:
        for _ in range(max_new_tokens):
            logits = model(ids[:, -context:])[:, -1, :].float()  # [B, V]
            logits = apply_repetition_penalty(logits, ids, repetition_penalty)
            if temperature == 0:
                next_token = logits.argmax(-1)
            else:
                logits = apply_top_p(apply_top_k(apply_temperature(logits, temperature), top_k), top_p)
                next_token = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
            if eos_token_id is not None:
                next_token = next_token.masked_fill(done, eos_token_id)
                done |= next_token == eos_token_id
            ids = torch.cat([ids, next_token[:, None]], dim=1)
            if bool(done.all()):
                break
    finally:
        model.train(was_training)
    return ids[:, prompt_ids.shape[1]:]
