"""Scoring, metrics and eval_samples.jsonl summaries of the LatentWire evaluation (no models needed)."""

import json

import pytest

from lmlab.errors import DataError
from lmlab.latentwire.evaluate import (
    SystemRun,
    derangement,
    format_eval_summary,
    score_outputs,
    summarize_eval,
    system_metrics,
)
from lmlab.stats import wilson_interval


def line(index, **systems):
    return json.dumps({"index": index, "question": f"q{index}", "gold": "7", "systems": {
        name: {"output": out, "strict": strict, "flexible": flexible, "correct_strict": strict == "7",
               "correct_flexible": flexible == "7"} for name, (out, strict, flexible) in systems.items()}})


HAND_WRITTEN = [
    line(0, bridged=(" 3 + 4 = 7\n#### 7", "7", "7"), target_text=(" it is 7", None, "7")),
    line(1, bridged=(" no idea", None, None), target_text=(" 8\n#### 8", "8", "8")),
    line(2, bridged=(" 6", None, "6"), target_text=("", None, None)),
]


def test_summarize_eval_counts_valid_and_invalid_answers(tmp_path):
    path = tmp_path / "eval_samples.jsonl"
    path.write_text("\n".join(HAND_WRITTEN) + "\n\n", encoding="utf-8")
    summary = summarize_eval([path])
    assert summary == {
        "bridged": {"total": 3, "valid": 2, "invalid": 1, "accuracy": pytest.approx(1 / 3), "evaluations": 1},
        "target_text": {"total": 3, "valid": 2, "invalid": 1, "accuracy": pytest.approx(1 / 3), "evaluations": 1},
    }
    table = format_eval_summary(summary).splitlines()
    assert table[0].split() == ["system", "total", "valid", "invalid", "accuracy", "evaluations"]
    assert table[1].split() == ["bridged", "3", "2", "1", "0.333", "1"]


def test_summarize_eval_counts_a_shared_text_evaluation_once(tmp_path):
    # Three cells of one run: target_text is one generation copied into each cell's file; bridged is new per cell.
    for seed in (1, 2, 3):
        (tmp_path / f"seed-{seed}").mkdir()
        (tmp_path / f"seed-{seed}" / "eval_samples.jsonl").write_text("\n".join(HAND_WRITTEN), encoding="utf-8")
    summary = summarize_eval([tmp_path])
    assert summary["target_text"] == {"total": 3, "valid": 2, "invalid": 1, "accuracy": pytest.approx(1 / 3),
                                      "evaluations": 1}
    assert summary["bridged"]["total"] == 9 and summary["bridged"]["evaluations"] == 3


def test_summarize_eval_searches_directories_recursively(tmp_path):
    (tmp_path / "a" / "seed-42").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "seed-42" / "eval_samples.jsonl").write_text("\n".join(HAND_WRITTEN), encoding="utf-8")
    (tmp_path / "b" / "eval_samples_step100.jsonl").write_text(HAND_WRITTEN[0], encoding="utf-8")
    (tmp_path / "b" / "other.jsonl").write_text("not read", encoding="utf-8")
    # A run directory: the test evaluations (eval_samples.jsonl) only, not the validation steps'
    assert summarize_eval([tmp_path])["bridged"] == {"total": 3, "valid": 2, "invalid": 1, "accuracy": 1 / 3,
                                                     "evaluations": 1}
    # A directory of validation evaluations only, or a file named explicitly: those
    assert summarize_eval([tmp_path / "b"])["bridged"] == {"total": 1, "valid": 1, "invalid": 0, "accuracy": 1.0,
                                                           "evaluations": 1}
    both = summarize_eval([tmp_path / "a", tmp_path / "b" / "eval_samples_step100.jsonl"])
    assert both["bridged"] == {"total": 4, "valid": 3, "invalid": 1, "accuracy": 0.5, "evaluations": 2}


def test_summarize_eval_names_the_bad_file_and_line(tmp_path):
    path = tmp_path / "eval_samples.jsonl"
    path.write_text(HAND_WRITTEN[0] + "\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"eval_samples.jsonl:2: not an eval_samples line"):
        summarize_eval([path])
    with pytest.raises(DataError, match="does not exist"):
        summarize_eval([tmp_path / "missing.jsonl"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no eval_samples"):
        summarize_eval([tmp_path / "empty"])


def test_derangement_moves_every_item():
    for n in (2, 3, 7):
        perm = derangement(n)
        assert sorted(perm) == list(range(n)) and all(perm[i] != i for i in range(n))
    with pytest.raises(DataError, match="at least 2"):
        derangement(1)


def test_system_metrics_from_scored_outputs():
    outputs = [" 2 + 5 = 7\n#### 7\n\nQuestion: 9", " the answer is 7", " #### 8", " nothing"]
    records = score_outputs(outputs, ["7", "7", "7", "3"])
    assert [(r["strict"], r["flexible"]) for r in records] == [("7", "7"), (None, "7"), ("8", "8"), (None, None)]
    run = SystemRun(outputs=outputs, prompt_tokens=[10, 12, 10, 12], context_tokens=[4, 4, 4, 4],
                    text_context_tokens=[30, 34, 30, 34], new_tokens=40, seconds=2.0, kv_bytes=1100.0)
    metrics = system_metrics("bridged", run, records, reference_kv_bytes=5000.0)
    assert metrics == {
        "bridged/acc_strict": 0.25,
        "bridged/acc_flexible": 0.5,
        "bridged/invalid_rate": 0.25,
        "bridged/acc_flexible_wilson95": wilson_interval(2, 4),
        "bridged/prompt_tokens": 11.0,
        "bridged/compression": 8.0,
        "bridged/kv_bytes": 1100.0,
        "bridged/kv_bytes_saved": 3900.0,
        "bridged/latency_s": 0.5,
        "bridged/tokens_per_s": 20.0,
    }
