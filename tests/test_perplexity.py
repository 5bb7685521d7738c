"""Perplexity: rolling windows, corpus NLL against an unbatched lm-evaluation-harness-style loop, positions, CLI."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import LMLAB  # python -m lmlab.cli (no installed entry point needed)
from helpers import ONE_THREAD as SUBPROCESS_ENV  # one thread, on the CPU also where there is a GPU
from lmlab.cli import main as lmlab_main
from lmlab.data import generators
from lmlab.eval.perplexity import evaluate_perplexity, full_windows, rolling_windows, window_nll

# ---------------------------------------------------------------------------------------------------
# Window layout (no model)


@pytest.mark.parametrize("max_length", range(1, 11))
def test_rolling_windows_predict_every_token_exactly_once(max_length):
    prefix = 1
    for n in range(0, 36):
        tokens = list(range(100, 100 + n))
        seq = [prefix, *tokens]
        for stride in range(1, max_length + 1):
            windows = rolling_windows(tokens, prefix, max_length, stride)
            predicted = [t for w in windows for t in w.targets[len(w.targets) - w.scored:]]
            assert predicted == tokens, (n, max_length, stride)
            done = 0
            for i, w in enumerate(windows):
                lo = seq.index(w.inputs[0]) if i else 0
                assert w.inputs == seq[lo:lo + len(w.inputs)] and w.targets == seq[lo + 1:lo + len(w.inputs) + 1]
                assert 1 <= w.scored <= len(w.inputs) <= max_length
                done += w.scored
                # Every window but the first sees max_length inputs; the first starts at the prefix.
                assert len(w.inputs) == (min(max_length, n) if i == 0 else max_length)
                assert w.scored == (min(max_length, n) if i == 0 else min(stride, n - (done - w.scored)))
                assert w.full == (stride == max_length and w.scored == max_length)
            assert done == n


def test_stride_outside_one_to_max_length_is_rejected():
    for stride in (-1, 9):
        with pytest.raises(ValueError, match="stride"):
            rolling_windows([5, 6, 7], 1, 8, stride)


def test_full_windows_are_the_non_overlapping_complete_ones():
    for n in range(0, 30):
        tokens = list(range(100, 100 + n))
        seq = [1, *tokens]
        for max_length in (1, 3, 7):
            windows = full_windows(tokens, 1, max_length)
            assert len(windows) == n // max_length
            for j, w in enumerate(windows):
                assert w.inputs == seq[j * max_length:(j + 1) * max_length]
                assert w.targets == tokens[j * max_length:(j + 1) * max_length]
                assert w.full and w.scored == max_length
            # With stride == max_length the full windows are exactly the rolling windows flagged full.
            rolled = [w for w in rolling_windows(tokens, 1, max_length) if w.full]
            assert rolled == windows


# ---------------------------------------------------------------------------------------------------
# Independent reference computations


def harness_windows(tokens: list[int], prefix: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(inputs, continuation) pairs of lm-evaluation-harness's rolling log-likelihood (context_len=1).

    Mirrors `get_rolling_token_windows` + `make_disjoint_window`: the first window is the prefix and the
    first max_length - 1 tokens, predicting the first max_length tokens; each later window predicts the
    next (at most) max_length tokens, given the max_length tokens before the last of them.
    """
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    pairs = [([prefix, *tokens[:first - 1]], tokens[:first])]
    predicted = first
    while predicted < len(tokens):
        k = min(len(tokens) - predicted, max_length)
        end = predicted + k
        pairs.append((tokens[end - max_length - 1:end - 1], tokens[end - k:end]))
        predicted = end
    return pairs


def strided_windows(tokens: list[int], prefix: int, max_length: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """docs/protocol.md section 4 with stride s: after the first window, predict s tokens given max_length inputs."""
    seq = [prefix, *tokens]
    first = min(max_length, len(tokens))
    pairs = [(seq[:first], tokens[:first])] if tokens else []
    predicted = first
    while predicted < len(tokens):
        end = min(predicted + stride, len(tokens))
        pairs.append((seq[max(0, end - max_length):end], tokens[predicted:end]))
        predicted = end
    return pairs


@torch.no_grad()
def reference_scores(model, pairs) -> tuple[float, int]:
    """Each window run alone, unpadded: summed NLL of its continuation (the last positions) and argmax hits."""
    total, hits = 0.0, 0
    for inputs, targets in pairs:
        logits = model(input_ids=torch.tensor([inputs])).logits[0, -len(targets):]
        total += float(F.cross_entropy(logits.double(), torch.tensor(targets), reduction="sum"))
        hits += int((logits.argmax(-1) == torch.tensor(targets)).sum())
    return total, hits


def reference_nll(model, pairs) -> float:
    return reference_scores(model, pairs)[0]


@torch.no_grad()
def reference_positional(model, token_docs, prefix: int, max_length: int) -> dict:
    """Per-decile perplexity and LIM-PPL from per-token losses of full, non-overlapping windows."""
    per_pos = [[] for _ in range(max_length)]
    for tokens in token_docs:
        seq = [prefix, *tokens]
        for start in range(0, len(tokens) - max_length + 1, max_length):
            logits = model(input_ids=torch.tensor([seq[start:start + max_length]])).logits[0]
            losses = F.cross_entropy(logits.double(), torch.tensor(seq[start + 1:start + max_length + 1]),
                                     reduction="none")
            for i, loss in enumerate(losses.tolist()):
                per_pos[i].append(loss)
    deciles = []
    for d in range(10):
        losses = [x for i in range(max_length) if i * 10 // max_length == d for x in per_pos[i]]
        deciles.append(math.exp(sum(losses) / len(losses)) if losses else None)
    middle = [x for i in range(max_length) if max_length <= 4 * i < 3 * max_length for x in per_pos[i]]
    return {"decile_ppl": deciles, "lim_ppl": math.exp(sum(middle) / len(middle)),
            "positional_tokens": sum(len(p) for p in per_pos)}


def documents() -> list[str]:
    """Documents of very different lengths: one token, shorter than a window, many windows, non-ASCII."""
    docs = generators.corpus_documents(7, 3, sentences_per_doc=6)
    docs += [d.text for d in generators.long_documents(7, 2, target_length=60, num_facts=2)]
    docs += ["a", "the lamp .", "caf\u00e9 \u2014 the \u00fcber tower is tall ."]
    return docs


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request):
    directory = request.getfixturevalue(f"tiny_{request.param}_dir")
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    return model, AutoTokenizer.from_pretrained(directory)


def token_docs_of(tokenizer, docs: list[str]) -> list[list[int]]:
    return [tokenizer.encode(d, add_special_tokens=False) for d in docs]


# ---------------------------------------------------------------------------------------------------
# Corpus perplexity


@pytest.mark.parametrize("max_length", [1, 16, 64])
def test_nll_equals_unbatched_harness_rolling_loop(lm, max_length):
    model, tok = lm
    docs = documents()
    token_docs = token_docs_of(tok, docs)
    assert min(map(len, token_docs)) == 1 and max(map(len, token_docs)) > 2 * max_length  # the cases we want
    result = evaluate_perplexity(model, docs, tok, max_length, batch_size=4)
    pairs = [p for toks in token_docs for p in harness_windows(toks, tok.bos_token_id, max_length)]
    expected, hits = reference_scores(model, pairs)
    n_tokens = sum(map(len, token_docs))
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    assert result["nll_sum"] == pytest.approx(expected, rel=1e-4)
    assert result["tokens"] == n_tokens and result["windows"] == len(pairs)
    assert result["bytes"] == n_bytes and result["documents"] == len(docs)
    assert result["ppl"] == pytest.approx(math.exp(expected / n_tokens), rel=1e-4)
    assert result["bpb"] == pytest.approx(expected / math.log(2) / n_bytes, rel=1e-4)
    assert result["accuracy"] == pytest.approx(hits / n_tokens) and 0 < hits < n_tokens


def test_padding_is_never_scored_batch_size_does_not_change_nll(lm):
    model, tok = lm
    docs = documents()
    one = evaluate_perplexity(model, docs, tok, 16, batch_size=1)
    seven = evaluate_perplexity(model, docs, tok, 16, batch_size=7)
    assert seven["nll_sum"] == pytest.approx(one["nll_sum"], rel=1e-5)
    assert seven["tokens"] == one["tokens"]
    for a, b in zip(seven["decile_ppl"], one["decile_ppl"], strict=True):
        assert a == pytest.approx(b, rel=1e-5)


@pytest.mark.parametrize("stride", [16, 5])
def test_evaluation_through_the_head_in_chunks_gives_the_full_logits_scores(lm, stride):
    """`window_nll(chunk=...)`: the LM head in chunks of tokens (no [tokens, vocab] logits) scores as the plain
    path - with padding, and with the leading unscored positions a batch of last windows skips (stride 5)."""
    from test_engine_lmhead import LargestTensor

    model, tok = lm
    windows = [w for toks in token_docs_of(tok, documents()) for w in rolling_windows(toks, tok.bos_token_id, 16,
                                                                                      stride)]
    vocab = model.get_output_embeddings().out_features
    results, largest = {}, {}
    for chunk in (0, 7):
        with LargestTensor() as seen:
            results[chunk] = window_nll(model, windows, 8, tok.pad_token_id or 0, chunk=chunk)
        largest[chunk] = seen.largest
    (total, count, hits, pos_nll, pos_count), plain = results[7], results[0]
    assert total.item() == pytest.approx(plain[0].item(), rel=1e-6) and count == plain[1] and hits == plain[2]
    torch.testing.assert_close(pos_nll, plain[3], rtol=1e-6, atol=1e-9)
    assert torch.equal(pos_count, plain[4])
    # a batch's full logits only on the plain path (the chunked one's largest: the [vocab, width] head weight)
    assert largest[0] >= 8 * 16 * vocab > largest[7]
    # and a HyLoRADA model (position bias, landmarks added to the hidden states the head reads) the same way
    import copy

    from lmlab.hylorada import HyLoRADAConfig, apply_hylorada

    adapted = apply_hylorada(copy.deepcopy(model), HyLoRADAConfig(r=4, num_landmarks=4, num_buckets=8),
                             max_positions=16).eval()
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # B and the gates off zero: every part acts
    plain, chunked = (window_nll(adapted, windows, 8, tok.pad_token_id or 0, chunk=c) for c in (0, 7))
    assert chunked[0].item() == pytest.approx(plain[0].item(), rel=1e-6) and chunked[2] == plain[2]


@pytest.mark.parametrize("stride", [1, 5, 12])
def test_stride_gives_more_context_but_still_scores_every_token_once(lm, stride):
    model, tok = lm
    docs = documents()
    token_docs = token_docs_of(tok, docs)
    strided = evaluate_perplexity(model, docs, tok, 16, stride=stride, batch_size=8, positional=False)
    plain = evaluate_perplexity(model, docs, tok, 16, batch_size=8, positional=False)
    expected = reference_nll(model, [p for t in token_docs for p in strided_windows(t, tok.bos_token_id, 16, stride)])
    assert strided["tokens"] == plain["tokens"] == sum(map(len, token_docs))
    assert strided["nll_sum"] == pytest.approx(expected, rel=1e-4)
    # the extra context changes the score by more than the precision the reference is matched to (a briefly trained
    # tiny model gains little from it: 0.075% at stride 1 with transformers 5.25, so no larger margin is assumed)
    assert abs(strided["nll_sum"] - plain["nll_sum"]) > 3e-4 * plain["nll_sum"]


@pytest.mark.parametrize(("max_length", "stride"), [(20, None), (20, 7), (16, None), (30, 30)])
def test_decile_and_lim_ppl_equal_hand_computation_over_full_windows(lm, max_length, stride):
    model, tok = lm
    docs = generators.corpus_documents(3, 4, sentences_per_doc=12) + ["too short ."]
    token_docs = token_docs_of(tok, docs)
    result = evaluate_perplexity(model, docs, tok, max_length, stride=stride, batch_size=3)
    expected = reference_positional(model, token_docs, tok.bos_token_id, max_length)
    assert expected["positional_tokens"] >= 4 * max_length
    assert result["positional_tokens"] == expected["positional_tokens"]
    assert result["lim_ppl"] == pytest.approx(expected["lim_ppl"], rel=1e-4)
    for got, want in zip(result["decile_ppl"], expected["decile_ppl"], strict=True):
        assert got == pytest.approx(want, rel=1e-4)


# ---------------------------------------------------------------------------------------------------
# `lmlab eval ppl`


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> list[Path]:
    directory = tmp_path_factory.mktemp("ppl-data")
    texts = [generators.corpus_documents(5, 1, sentences_per_doc=8)[0] + "\n",
             "the caf\u00e9 is quiet \u2014 \u00fcber quiet .\n\nalice waits early ."]
    paths = []
    for i, text in enumerate(texts):
        path = directory / f"f{i + 1}.txt"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


def expected_cli_result(model_dir: Path, paths: list[Path], max_length: int) -> dict:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    docs = [p.read_text(encoding="utf-8") for p in paths]
    token_docs = token_docs_of(tok, docs)
    nll = reference_nll(model, [p for t in token_docs for p in harness_windows(t, tok.bos_token_id, max_length)])
    tokens = sum(map(len, token_docs))
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    return {"ppl": math.exp(nll / tokens), "nll_sum": nll, "tokens": tokens, "bytes": n_bytes,
            "bpb": nll / math.log(2) / n_bytes}


def assert_matches(result: dict, expected: dict) -> None:
    assert result["tokens"] == expected["tokens"] and result["bytes"] == expected["bytes"]
    for key in ("ppl", "nll_sum", "bpb"):
        assert result[key] == pytest.approx(expected[key], rel=1e-4), key


def test_cli_eval_ppl_in_process_prints_the_independent_numbers(tiny_llama_dir, data_files, capsys):
    code = lmlab_main(["eval", "ppl", "--model", str(tiny_llama_dir), "--data", *map(str, data_files),
                       "--max-length", "12", "--batch-size", "3"])
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert_matches(result, expected_cli_result(tiny_llama_dir, data_files, 12))
    assert len(result["decile_ppl"]) == 10 and result["lim_ppl"] > 1


def test_cli_eval_ppl_as_a_subprocess(tiny_gpt2_dir, data_files):
    proc = subprocess.run(
        [*LMLAB, "eval", "ppl", "--model", str(tiny_gpt2_dir), "--data", *map(str, data_files),
         "--max-length", "20"],
        capture_output=True, text=True, timeout=300, env=SUBPROCESS_ENV,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert_matches(result, expected_cli_result(tiny_gpt2_dir, data_files, 20))


def run_bad(argv: list[str], capsys) -> str:
    code = lmlab_main(argv)
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmlab: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_cli_bad_inputs_exit_2_with_one_line(tiny_llama_dir, data_files, tmp_path, capsys):
    model = str(tiny_llama_dir)
    line = run_bad(["eval", "ppl", "--model", model, "--data", str(tmp_path / "missing.txt"), "--max-length", "8"],
                   capsys)
    assert "missing.txt" in line and "does not exist" in line
    line = run_bad(["eval", "ppl", "--model", model, "--data", str(data_files[0]), "--max-length", "8",
                    "--stride", "9"], capsys)
    assert "--stride" in line
    config_only = tmp_path / "config-only"
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).config.save_pretrained(config_only)
    line = run_bad(["eval", "ppl", "--model", str(config_only), "--data", str(data_files[0]), "--max-length", "8"],
                   capsys)
    assert str(config_only) in line and "weights" in line
    run_bad(["eval", "ppl", "--model", model, "--data", str(data_files[0])], capsys)  # --max-length missing
    assert "--max-length" in run_bad(["eval", "ppl", "--model", model, "--data", str(data_files[0]),
                                      "--max-length", "0"], capsys)


def test_cli_bad_input_in_a_real_process_has_no_traceback(tmp_path, data_files):
    proc = subprocess.run(
        [*LMLAB, "eval", "ppl", "--model", str(tmp_path / "no-model"), "--data", str(data_files[0]),
         "--max-length", "8"],
        capture_output=True, text=True, timeout=300, env=SUBPROCESS_ENV,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"lmlab: error: model directory {tmp_path / 'no-model'} does not exist"]


def test_cli_max_length_beyond_learned_positions_is_a_usage_error(tiny_gpt2_dir, tmp_path, capsys):
    long_doc = tmp_path / "long.txt"
    long_doc.write_text(" ".join(generators.corpus_documents(1, 3)), encoding="utf-8")
    line = run_bad(["eval", "ppl", "--model", str(tiny_gpt2_dir), "--data", str(long_doc), "--max-length", "200"],
                   capsys)
    assert "--max-length" in line and "128" in line
