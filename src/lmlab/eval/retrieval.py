"""Retrieval accuracy by depth on built-in long-context documents (docs/protocol.md section 4).

For each planted fact, the prompt is the document up to its query's "answer :" (preceded by the
prefix token, left-truncated to the window), the model continues greedily, and the answer counts when
the continuation's first number equals the fact's value exactly. Accuracy is grouped by the depth
decile of the planted fact (needle-in-a-haystack / lost-in-the-middle).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from lmlab import progress as bars
from lmlab.data.generators import LongDocument
from lmlab.engine import distributed as D
from lmlab.eval.generation import greedy_generate, left_pad
from lmlab.models.hf import prefix_token_id

_FIRST_NUMBER = re.compile(r"\s*(\d+)")


def answer_matches(continuation: str, value: str) -> bool:
    """Exact match of the first number of the continuation (leading spaces allowed) with `value`."""
    m = _FIRST_NUMBER.match(continuation)
    return bool(m) and m.group(1) == value


@torch.no_grad()
def retrieval_accuracy(model: nn.Module, tokenizer, docs: Sequence[LongDocument], max_length: int, *,
                       batch_size: int = 16) -> dict:
    """Overall accuracy, accuracy and count per depth decile, the number of queries, `outcomes`: 1 / 0 per query in the
    documents' order (for paired comparisons of two models on the same queries), and `distances`: per query, the
    tokens from the start of its fact to its answer (how far back the model must look)."""
    prefix = prefix_token_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    queries = [(doc.text[:fact.answer_offset].rstrip(), fact) for doc in docs for fact in doc.facts]
    if not queries:
        return {"retrieval_acc": None, "by_depth": [None] * 10, "counts": [0] * 10, "queries": 0, "outcomes": [],
                "distances": []}
    new_tokens = max(len(f.value) for _, f in queries) + 2
    budget = max_length - new_tokens  # the prompt plus the answer stay within the window
    encoded = tokenizer([p for p, _ in queries], add_special_tokens=False, verbose=False)["input_ids"]
    spans = tokenizer([doc.text[fact.fact_offset:fact.answer_offset] for doc in docs for fact in doc.facts],
                      add_special_tokens=False, verbose=False)["input_ids"]
    prompts = [([prefix, *ids])[-budget:] for ids in encoded]
    device = next(model.parameters()).device
    mine = list(range(D.rank(), len(prompts), D.world_size()))
    # Longest first so batches pad little.
    mine.sort(key=lambda i: -len(prompts[i]))
    correct_local: dict[int, bool] = {}
    for start in bars.bar(range(0, len(mine), batch_size), desc="retrieval (generating)", unit="batch"):
        idx = mine[start:start + batch_size]
        ids, mask = left_pad([prompts[i] for i in idx], pad, device=device)
        out = greedy_generate(model, mask, new_tokens, input_ids=ids, pad_token_id=pad)
        for row, i in enumerate(idx):
            text = tokenizer.decode(out[row], skip_special_tokens=True)
            correct_local[i] = answer_matches(text, queries[i][1].value)
    correct: dict[int, bool] = {}
    for part in D.gather_objects(correct_local):
        correct.update(part)
    hits = [0] * 10
    counts = [0] * 10
    for i, (_, fact) in enumerate(queries):
        decile = min(9, int(fact.depth * 10))
        counts[decile] += 1
        hits[decile] += int(correct[i])
    return {
        "retrieval_acc": sum(hits) / len(queries),
        "by_depth": [h / c if c else None for h, c in zip(hits, counts, strict=True)],
        "counts": counts,
        "queries": len(queries),
        "outcomes": [int(correct[i]) for i in range(len(queries))],
        "distances": [len(ids) for ids in spans],
    }
