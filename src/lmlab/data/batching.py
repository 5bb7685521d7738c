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


def packed_examples(token_docs: Sequence[list[int]], seq_len: int, separator_id: int,
                    end_id: int | None = None) -> list[dict]:
    """Documents joined into one stream, each preceded by `separator_id` (and followed by `end_id` when given), and
    cut into full blocks of `seq_len` tokens (no padding, no short tails counted as windows).

    The standard language-modelling layout; the last partial block is dropped.
    """
    stream: list[int] = []
    for tokens in token_docs:
        stream.append(separator_id)
        stream.extend(tokens)
        if end_id is not None:
            stream.append(end_id)
    return [{"input_ids": stream[i:i + seq_len]} for i in range(0, len(stream) - seq_len + 1, seq_len)]


def recall_examples(docs: Sequence, tokenizer, seq_len: int, prefix_id: int, *, end_id: int | None = None,
                    value_weight: float | None = None) -> list[dict]:
    """Built-in long documents (`generators.LongDocument`), each preceded by `prefix_id` (and followed by `end_id`)
    and cut to `seq_len` tokens, as examples that stress recalling the planted values.

    Without `value_weight` only the values the queries recall are in the loss (`labels` -100 elsewhere); with it
    every token is, and those values weigh `value_weight` (`loss_weights`, see `engine.train.causal_lm_loss`).
    Plain next-token loss spends almost all of its gradient on the filler text, so a tiny model trained on it for
    minutes never learns to copy a value from far back.
    """
    texts = [d.text for d in docs]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True) if texts else {"input_ids": []}
    examples = []
    for doc, ids, offsets in zip(docs, encoded["input_ids"], encoded.get("offset_mapping", []), strict=True):
        spans = [(f.answer_offset, f.answer_offset + len(f.value)) for f in doc.facts]
        recalled = [any(start < span_end and end > span_start for span_start, span_end in spans)
                    for start, end in offsets]
        end = () if end_id is None else (end_id,)
        inputs = [prefix_id, *ids, *end][:seq_len]
        flags = [False, *recalled, *(False for _ in end)][:seq_len]
        if not any(flags):
            continue
        if value_weight is None:
            examples.append({"input_ids": inputs, "labels": [t if f else -100 for t, f in zip(inputs, flags,
                                                                                              strict=True)]})
        else:
            examples.append({"input_ids": inputs, "loss_weights": [value_weight if f else 1.0 for f in flags]})
    return examples
