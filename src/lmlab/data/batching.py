"""Turning documents into training examples for causal language modelling."""

from __future__ import annotations

from collections.abc import Sequence


def tokenize_documents(docs: Sequence[str], tokenizer) -> list[list[int]]:
    """Token ids of each document, without special tokens (batched through the fast tokenizer)."""
    if not docs:
        return []
    return tokenizer(list(docs), add_special_tokens=False)["input_ids"]


def chunk_examples(token_docs: Sequence[list[int]], seq_len: int, prefix_id: int,
                   end_id: int | None = None) -> list[dict]:
    """Each document, preceded by `prefix_id` (BOS/EOS) and followed by `end_id` when given, cut into pieces
    of at most `seq_len` tokens.

    Documents never share an example (no cross-document attention); a short last piece is kept and
    padded at batching time, where its padding is masked out of the loss. `end_id` (EOS) teaches a model
    trained from scratch where a document ends, so that its generations stop (an answer after `#### N`).
    """
    examples = []
    for tokens in token_docs:
        seq = [prefix_id, *tokens, *(() if end_id is None else (end_id,))]
        for start in range(0, len(seq), seq_len):
            piece = seq[start:start + seq_len]
            if len(piece) >= 2:
                examples.append({"input_ids": piece})
    return examples


def packed_examples(token_docs: Sequence[list[int]], seq_len: int, separator_id: int) -> list[dict]:
    """Documents joined with a separator and cut into full blocks of `seq_len` tokens (no padding).

    The standard from-scratch language-modelling layout; the last partial block is dropped.
    """
    stream: list[int] = []
    for tokens in token_docs:
        stream.append(separator_id)
        stream.extend(tokens)
    return [{"input_ids": stream[i:i + seq_len]} for i in range(0, len(stream) - seq_len + 1, seq_len)]
