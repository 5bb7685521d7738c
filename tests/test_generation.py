"""Batched greedy generation with a KV cache and left padding, against a per-sequence loop without cache."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO
from lmlab.eval.generation import greedy_generate, left_pad, positions_from_mask

PROMPTS = [
    "alice repairs the",
    "question : what is the code of ORION ? answer :",
    "in the old",
    "t",
    "remember that the key of VEGA is 9120 . the quiet lamp is in the",
]
NEW_TOKENS = 10


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request):
    directory = request.getfixturevalue(f"tiny_{request.param}_dir")
    return AutoModelForCausalLM.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)


def prompt_ids(tok) -> list[list[int]]:
    return [[tok.bos_token_id, *tok.encode(p, add_special_tokens=False)] for p in PROMPTS]


@torch.no_grad()
def reference_greedy(model, ids: list[int], n: int) -> list[int]:
    """Argmax continuation of one unpadded sequence, re-running the whole sequence at every step (no cache)."""
    seq = list(ids)
    for _ in range(n):
        logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
        seq.append(int(logits.argmax()))
    return seq[len(ids):]


@pytest.fixture(scope="module")
def reference(lm) -> list[list[int]]:
    model, tok = lm
    return [reference_greedy(model, ids, NEW_TOKENS) for ids in prompt_ids(tok)]


def expected_with_stops(reference: list[list[int]], stop_at: list[int | None], pad: int) -> torch.Tensor:
    """Rows cut after their stop index and padded; the batch ends when every row has stopped."""
    width = NEW_TOKENS if any(s is None for s in stop_at) else max(stop_at) + 1
    rows = []
    for ref, stop in zip(reference, stop_at, strict=True):
        keep = ref[:width] if stop is None else ref[:stop + 1]
        rows.append(keep + [pad] * (width - len(keep)))
    return torch.tensor(rows)


def test_left_pad_and_positions_count_real_tokens_only():
    ids, mask = left_pad([[5, 6, 7], [8], []], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert positions_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 0]]


def test_batched_greedy_equals_per_sequence_loop(lm, reference):
    model, tok = lm
    ids, mask = left_pad(prompt_ids(tok), tok.pad_token_id)
    assert mask.sum(1).tolist() != [mask.shape[1]] * len(PROMPTS)  # rows really are padded
    out = greedy_generate(model, mask, NEW_TOKENS, input_ids=ids, pad_token_id=tok.pad_token_id)
    assert out.tolist() == reference
    assert len({tuple(r) for r in reference}) > 1  # continuations depend on the prompt


def test_prompt_step_computes_only_the_last_positions_logits(lm, reference):
    """Every forward returns logits of one position (transformers' `logits_to_keep`), not [B, T, vocab] for the
    prompt, with the reference's tokens; a model whose forward has no `logits_to_keep` is called without it."""
    model, tok = lm
    ids, mask = left_pad(prompt_ids(tok), tok.pad_token_id)
    widths = []
    hook = model.register_forward_hook(lambda module, args, out: widths.append(out.logits.shape[1]))
    try:
        out = greedy_generate(model, mask, NEW_TOKENS, input_ids=ids, pad_token_id=tok.pad_token_id)
    finally:
        hook.remove()
    assert out.tolist() == reference and widths == [1] * NEW_TOKENS and ids.shape[1] > 1

    # benchmarks/generation.py's reference side: the model behind a forward with a fixed signature, as a custom
    # model may have (so the benchmark's "full" side is tested to compute every position and the same tokens)
    spec = importlib.util.spec_from_file_location("generation_bench", REPO / "benchmarks" / "generation.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    widths.clear()
    hook = model.register_forward_hook(lambda module, args, out: widths.append(out.logits.shape[1]))
    try:
        out = greedy_generate(bench.FullLogits(model), mask, NEW_TOKENS, input_ids=ids, pad_token_id=tok.pad_token_id)
    finally:
        hook.remove()
    assert out.tolist() == reference and widths == [ids.shape[1]] + [1] * (NEW_TOKENS - 1)


def test_inputs_embeds_path_equals_input_ids_path(lm, reference):
    model, tok = lm
    ids, mask = left_pad(prompt_ids(tok), tok.pad_token_id)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)  # [B, T, d]
    out = greedy_generate(model, mask, NEW_TOKENS, inputs_embeds=embeds, pad_token_id=tok.pad_token_id)
    assert out.tolist() == reference


def test_eos_stops_a_row_and_pads_it(lm, reference):
    model, tok = lm
    eos = reference[0][2]  # the token row 0 produces third: row 0 must stop right there
    stop_at = [ref.index(eos) if eos in ref else None for ref in reference]
    ids, mask = left_pad(prompt_ids(tok), tok.pad_token_id)
    out = greedy_generate(model, mask, NEW_TOKENS, input_ids=ids, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    assert stop_at[0] <= 2
    assert torch.equal(out, expected_with_stops(reference, stop_at, tok.pad_token_id))


def test_generation_ends_early_when_every_row_hit_eos(lm, reference):
    model, tok = lm
    first = reference[1][0]
    ids, mask = left_pad([prompt_ids(tok)[1]] * 3, tok.pad_token_id)
    out = greedy_generate(model, mask, NEW_TOKENS, input_ids=ids, eos_token_id=first, pad_token_id=tok.pad_token_id)
    assert out.tolist() == [[first]] * 3


def test_stop_strings_stop_rows(lm, reference):
    model, tok = lm
    # A piece of text row 0 generates at its 4th token; each row stops at the first token whose
    # decoded continuation contains it.
    stop = tok.decode(reference[0][3:4])
    assert stop.strip()

    def first_stop(ref: list[int]) -> int | None:
        return next((t for t in range(len(ref)) if stop in tok.decode(ref[:t + 1], skip_special_tokens=True)), None)

    stop_at = [first_stop(ref) for ref in reference]
    ids, mask = left_pad(prompt_ids(tok), tok.pad_token_id)
    out = greedy_generate(model, mask, NEW_TOKENS, input_ids=ids, stop_strings=[stop], tokenizer=tok,
                          pad_token_id=tok.pad_token_id)
    assert stop_at[0] is not None and stop_at[0] <= 3
    assert torch.equal(out, expected_with_stops(reference, stop_at, tok.pad_token_id))


def test_argument_errors_and_zero_tokens(lm):
    model, tok = lm
    ids, mask = left_pad(prompt_ids(tok)[:2], tok.pad_token_id)
    with pytest.raises(ValueError, match="exactly one"):
        greedy_generate(model, mask, 3)
    with pytest.raises(ValueError, match="tokenizer"):
        greedy_generate(model, mask, 3, input_ids=ids, stop_strings=["."])
    assert greedy_generate(model, mask, 0, input_ids=ids).shape == (2, 0)
    model.train()
    greedy_generate(model, mask, 2, input_ids=ids)
    assert model.training  # the caller's mode is restored
    model.eval()
