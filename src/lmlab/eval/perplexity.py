"""Corpus-level perplexity, bits per byte and position-resolved perplexity (docs/protocol.md section 4).

The one definition every study and `lmlab eval ppl` use:
- each document is scored on its own: its tokens (no special tokens) preceded by the prefix token
  (BOS, else EOS); every document token is predicted exactly once, the first from the prefix alone;
- a window holds at most `max_length` input tokens; the first window predicts the first `max_length`
  tokens, each later one the next `stride` tokens given the `max_length` tokens before the last of them
  (with stride = max_length this is lm-evaluation-harness's rolling log-likelihood);
- perplexity = exp(total NLL / total predicted tokens) over the whole split; bits per byte =
  NLL / ln 2 / UTF-8 bytes;
- position-resolved: over full, non-overlapping windows of `max_length` (a document's last partial
  window left out), perplexity per decile of relative position (index in window / max_length) and
  LIM-PPL over relative positions in [0.25, 0.75).
Windows of many documents are batched (right padding, never scored) and split across processes.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmlab import progress as bars
from lmlab.engine import distributed as D
from lmlab.engine import lmhead
from lmlab.engine.losses import model_logits
from lmlab.models.hf import prefix_token_id


@dataclass(frozen=True)
class Window:
    inputs: list[int]   # at most max_length tokens
    targets: list[int]  # next token of each input position
    scored: int         # the last `scored` positions are predictions that count
    full: bool = False  # a full window of max_length predictions: counts for position-resolved perplexity


def rolling_windows(tokens: Sequence[int], prefix_id: int, max_length: int, stride: int | None = None) -> list[Window]:
    """Windows that predict every token of one document exactly once (module docstring)."""
    stride = stride or max_length
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    seq = [prefix_id, *tokens]
    n = len(tokens)
    if n == 0:
        return []
    hi = min(max_length, n)
    # With stride == max_length, the windows that predict max_length tokens are exactly the full windows.
    full_ok = stride == max_length
    windows = [Window(seq[:hi], seq[1:hi + 1], hi, full_ok and hi == max_length)]
    predicted = hi
    while predicted < n:
        k = min(stride, n - predicted)
        hi = predicted + k
        lo = max(0, hi - max_length)
        windows.append(Window(seq[lo:hi], seq[lo + 1:hi + 1], k, full_ok and k == max_length))
        predicted = hi
    return windows


def full_windows(tokens: Sequence[int], prefix_id: int, max_length: int) -> list[Window]:
    """Non-overlapping windows of exactly `max_length` predictions (the last partial one left out)."""
    seq = [prefix_id, *tokens]
    return [Window(seq[s:s + max_length], seq[s + 1:s + max_length + 1], max_length, True)
            for s in range(0, len(tokens) - max_length + 1, max_length)]


@torch.no_grad()
def window_nll(model: nn.Module, windows: Sequence[Window], batch_size: int, pad_id: int = 0,
               chunk: int | str | None = "auto"):
    """Summed NLL, count and argmax hits of the scored predictions of `windows` (this process's share),
    and the NLL and count per position index over the full windows among them ([max_len] tensors).

    `chunk`: tokens per chunk of the LM head (`lmlab.engine.lmhead`), so that a batch never forms its full
    [tokens, vocab] logits; `auto` (as `train.loss_chunk`) only where those logits would be large."""
    device = next(model.parameters()).device
    head = lmhead.output_head(model)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = hits = 0
    width = max((len(w.inputs) for w in windows), default=0)
    pos_nll = torch.zeros(width, dtype=torch.float64, device=device)
    pos_count = torch.zeros(width, dtype=torch.float64, device=device)
    # Hugging Face LMs can skip the LM head on leading context-only positions (a document's last window).
    trims_logits = _accepts(model, "logits_to_keep")
    # Longest first, so each batch pads little; among equal lengths, windows that score from the same
    # position onwards batch together, so a batch of last windows skips their shared unscored prefix.
    order = sorted(range(len(windows)),
                   key=lambda i: (-len(windows[i].inputs), len(windows[i].inputs) - windows[i].scored))
    for start in bars.bar(range(0, len(order), batch_size), desc="evaluating", unit="batch"):
        group = [windows[i] for i in order[start:start + batch_size]]
        length = max(len(w.inputs) for w in group)
        first = min(len(w.inputs) - w.scored for w in group) if trims_logits else 0  # first scored position
        ids = torch.full((len(group), length), pad_id, dtype=torch.long)
        labels = torch.full((len(group), length - first), -100, dtype=torch.long)
        for row, w in enumerate(group):
            n = len(w.inputs)
            ids[row, :n] = torch.tensor(w.inputs)
            labels[row, n - w.scored - first:n - first] = torch.tensor(w.targets[n - w.scored:])
        ids, labels = ids.to(device), labels.to(device)
        # Right padding needs no attention mask in a causal model: real tokens never see later positions.
        kept = {"logits_to_keep": length - first} if first > 0 else {}
        nll, hit = _scored_nll(model, head, ids, labels, kept, chunk)
        hits += int(hit.sum())
        total += nll.sum(dtype=torch.float64)
        count += int((labels != -100).sum())
        full = torch.tensor([w.full for w in group], device=device)
        if bool(full.any()):
            scored = (labels[full] != -100).double()
            pos_nll[first:length] += (nll[full].double() * scored).sum(0)
            pos_count[first:length] += scored.sum(0)
    return total, count, hits, pos_nll, pos_count


def _scored_nll(model: nn.Module, head: nn.Linear | None, ids: torch.Tensor, labels: torch.Tensor, kept: dict,
                chunk: int | str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position of `labels` ([B, L]) its NLL (0 where not scored) and whether the argmax is the label: through
    the head in chunks where `chunk` says so and the model passes its head the hidden states of exactly those
    positions, else from the full logits."""
    size = lmhead.chunk_size(chunk, labels.numel(), head.out_features) if head is not None else None
    if size is not None:
        with lmhead.hidden_states_of(head) as seen:
            model(input_ids=ids, **kept)
        if len(seen) == 1 and seen[0].shape[:-1] == labels.shape:
            nll, hits = lmhead.chunked_scores(seen[0].reshape(labels.numel(), -1), head, labels.reshape(-1), size)
            return nll.view(labels.shape), hits.view(labels.shape)
    logits = model_logits(model(input_ids=ids, **kept))  # [B, L, V]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100,
                          reduction="none").view(labels.shape)
    return nll, (logits.argmax(-1) == labels) & (labels != -100)


def _accepts(model: nn.Module, argument: str) -> bool:
    """Whether `model.forward` takes `argument` by name."""
    try:
        return argument in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def evaluate_perplexity(
    model: nn.Module,
    docs: Sequence[str],
    tokenizer,
    max_length: int,
    *,
    stride: int | None = None,
    batch_size: int = 8,
    positional: bool = True,
    prefix_id: int | None = None,
) -> dict:
    """Perplexity, NLL, tokens, bytes, bits per byte, and per-decile perplexity / LIM-PPL of `docs`."""
    started = time.perf_counter()
    stride = stride or max_length
    prefix = prefix_token_id(tokenizer) if prefix_id is None else prefix_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    token_docs = tokenizer(list(docs), add_special_tokens=False, verbose=False)["input_ids"] if docs else []
    windows = [w for toks in token_docs for w in rolling_windows(toks, prefix, max_length, stride)]
    mine = windows[D.rank()::D.world_size()]
    was_training = model.training
    model.eval()
    try:
        nll, count, hits, pos_nll, pos_count = window_nll(model, mine, batch_size, pad_id)
        if positional and stride != max_length:
            full = [w for toks in token_docs for w in full_windows(toks, prefix, max_length)]
            _, _, _, pos_nll, pos_count = window_nll(model, full[D.rank()::D.world_size()], batch_size, pad_id)
    finally:
        model.train(was_training)
    counts = torch.tensor([float(count), float(hits)], dtype=torch.float64, device=nll.device)
    stats = D.all_reduce_sum(torch.cat([nll.reshape(1), counts]))
    nll_sum, tokens, correct = float(stats[0]), int(round(float(stats[1]))), int(round(float(stats[2])))
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    result = {
        "ppl": math.exp(nll_sum / tokens) if tokens else None,
        "nll_sum": nll_sum,
        "tokens": tokens,
        "bytes": n_bytes,
        "bpb": nll_sum / math.log(2) / n_bytes if n_bytes else None,
        "accuracy": correct / tokens if tokens else None,  # next-token argmax accuracy
        "documents": len(docs),
        "windows": len(windows),
        "max_length": max_length,
        "stride": stride,
    }
    if positional:
        result.update(_positional(pos_nll, pos_count, max_length))
    result["tokens_per_s"] = tokens / max(time.perf_counter() - started, 1e-9)
    return result


def positional_perplexity(model: nn.Module, windows: Sequence[Sequence[int]], prefix_id: int, max_length: int, *,
                          batch_size: int = 8, pad_id: int = 0) -> dict:
    """Per-decile perplexity and LIM-PPL over given token windows of exactly `max_length` tokens each (each scored
    from the prefix token: the first full window of a document). Scoring every model on the same windows makes the
    figures comparable; `decile_tokens` / `lim_tokens` say how many predictions each covers."""
    bad = [len(w) for w in windows if len(w) != max_length]
    if bad:
        raise ValueError(f"every window must hold max_length={max_length} tokens, got {bad[0]}")
    full = [full_windows(w, prefix_id, max_length)[0] for w in windows]
    was_training = model.training
    model.eval()
    try:
        _, _, _, pos_nll, pos_count = window_nll(model, full[D.rank()::D.world_size()], batch_size, pad_id)
    finally:
        model.train(was_training)
    return _positional(pos_nll, pos_count, max_length)


def _positional(pos_nll: torch.Tensor, pos_count: torch.Tensor, max_length: int) -> dict:
    nll = torch.zeros(max_length, dtype=torch.float64, device=pos_nll.device)
    cnt = torch.zeros(max_length, dtype=torch.float64, device=pos_nll.device)
    nll[: len(pos_nll)] += pos_nll[:max_length]
    cnt[: len(pos_count)] += pos_count[:max_length]
    both = D.all_reduce_sum(torch.stack([nll, cnt]))
    nll, cnt = both[0].cpu(), both[1].cpu()
    if float(cnt.sum()) == 0:
        return {"decile_ppl": None, "lim_ppl": None, "positional_tokens": 0, "decile_tokens": [0] * 10,
                "lim_tokens": 0}
    rel = torch.arange(max_length, dtype=torch.float64) / max_length
    decile = torch.clamp((rel * 10).floor().long(), max=9)
    deciles, decile_tokens = [], []
    for d in range(10):
        sel = decile == d
        c = float(cnt[sel].sum())
        deciles.append(math.exp(float(nll[sel].sum()) / c) if c else None)
        decile_tokens.append(int(c))
    mid = (rel >= 0.25) & (rel < 0.75)
    mid_count = float(cnt[mid].sum())
    return {
        "decile_ppl": deciles,
        "lim_ppl": math.exp(float(nll[mid].sum()) / mid_count) if mid_count else None,
        "positional_tokens": int(cnt.sum()),
        "decile_tokens": decile_tokens,
        "lim_tokens": int(mid_count),
    }
