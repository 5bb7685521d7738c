"""lm-evaluation-harness on lmlab's models (`lmlab eval lm-eval`, `lmlab.eval.harness`, a study's `lm_eval:` field),
offline, with the real library: tasks defined by YAML files over local JSONL files, scores checked against
computations that do not use lm-eval, and an lmlab adapter scored in process equal to its peft export loaded by
lm-eval's own `peft=` path."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from helpers import ONE_THREAD, read_jsonl, require_extras, run_cli, save_tiny_model
from lmlab.cli import main
from lmlab.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

OFFLINE = {**ONE_THREAD, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TEXTS = ["the cat sat on the mat by the door", "a dog ran in the park with a red ball",
         "the bird sang in the tall green tree", "one fish swam in the cold blue lake"] * 15
QUESTIONS = [  # (context, choices, answer): choices of different lengths, so acc_norm can differ from acc
    ("the cat sat on the", ["mat", "park", "tree", "lake"], 0),
    ("a dog ran in the", ["mat", "park", "tree", "lake"], 1),
    ("the bird sang in the tall green", ["door", "ball", "tree", "fish"], 2),
    ("one fish swam in the cold blue", ["mat", "ball", "door", "lake"], 3),
    ("the cat sat on the mat by the", ["door", "dog", "red ball", "bird"], 0),
    ("a dog ran in the park with a red", ["ball", "cat", "tree", "green lake"], 0),
    ("the bird", ["sang", "ran", "swam", "sat on"], 0),
    ("one fish", ["swam", "sang", "ran", "sat"], 0),
]
DOCS = ["the cat sat on the mat by the door and a dog ran in the park",
        "one fish swam in the cold blue lake while the bird sang in the tall green tree",
        "a red ball by the door", "the tall green tree by the cold blue lake", "a dog and a cat and a bird"]
TASKS = ["lmlab_choice", "lmlab_text"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("lm-eval-model"), texts=TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """Two lm-eval tasks over local JSONL files: multiple choice (acc, acc_norm) and rolling log-likelihood
    (word/byte perplexity, bits per byte)."""
    directory = tmp_path_factory.mktemp("lm-eval-tasks")
    rows = [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS]
    (directory / "choice.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (directory / "text.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
    (directory / "choice.yaml").write_text(f"""task: lmlab_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {directory / 'choice.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""", encoding="utf-8")
    (directory / "text.yaml").write_text(f"""task: lmlab_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {directory / 'text.jsonl'}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""", encoding="utf-8")
    return directory


def independent_accuracy(model_dir: Path) -> tuple[float, float]:
    """acc and acc_norm of the multiple-choice task, with the model and tokenizer alone: each choice scored by the
    summed log-probabilities of its tokens (' ' + choice after the context), acc_norm dividing by its length."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    hits = hits_norm = 0
    for context, choices, answer in QUESTIONS:
        scores = []
        for choice in choices:
            ctx = tok.encode(context)
            whole = tok.encode(context + " " + choice)
            cont = whole[len(ctx):]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].double(), dim=-1)
            scores.append(sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)))
        hits += max(range(4), key=lambda i: scores[i]) == answer
        hits_norm += max(range(4), key=lambda i: scores[i] / len(choices[i])) == answer
    return hits / len(QUESTIONS), hits_norm / len(QUESTIONS)


@pytest.fixture(autouse=True)
def _lm_eval_installed(request):
    """lm-eval is an extra (`make setup` installs it); on a bare image that lacks it, see helpers.require_extras."""
    if "without_lm_eval_installed" not in request.node.name:
        require_extras("lm_eval")


def test_the_cli_scores_a_local_task_as_an_independent_computation(model_dir, task_dir):
    proc = run_cli("eval", "lm-eval", "--model", str(model_dir), "--tasks", ",".join(TASKS), "--include-path",
                   str(task_dir), "--limit", "8", env=OFFLINE)
    assert proc.returncode == 0, proc.stderr
    for noise in ("Traceback", "WARNING", "it/s", "fatal:", "Warning"):  # lm-eval's logs and bars stay off
        assert noise not in proc.stderr, proc.stderr
    results = json.loads(proc.stdout)
    assert set(results["results"]) == set(TASKS)
    assert results["n-samples"]["lmlab_choice"] == {"original": 8, "effective": 8}
    acc, acc_norm = independent_accuracy(model_dir)
    choice = results["results"]["lmlab_choice"]
    assert (choice["acc,none"], choice["acc_norm,none"]) == (acc, acc_norm)
    assert 0 < acc < 1 and acc != acc_norm  # not a trivial score, and the two metrics differ on this data

    # the rolling log-likelihood is lmlab's own perplexity definition with stride = window (docs/protocol.md)
    from lmlab.eval.perplexity import evaluate_perplexity
    from lmlab.models.hf import load_causal_lm, load_tokenizer

    ours = evaluate_perplexity(load_causal_lm(str(model_dir)), DOCS, load_tokenizer(str(model_dir)), 64)
    text = results["results"]["lmlab_text"]
    assert text["bits_per_byte,none"] == pytest.approx(ours["bpb"], rel=1e-5)
    assert text["byte_perplexity,none"] == pytest.approx(2 ** ours["bpb"], rel=1e-5)
    assert results["config"]["model"] == str(model_dir) and results["config"]["adapter"] is None

    from lmlab.eval.harness import lm_eval_scores

    assert lm_eval_scores(results) == {
        "lm_eval/lmlab_choice/acc": acc, "lm_eval/lmlab_choice/acc_norm": acc_norm,
        "lm_eval/lmlab_text/bits_per_byte": text["bits_per_byte,none"],
        "lm_eval/lmlab_text/byte_perplexity": text["byte_perplexity,none"],
        "lm_eval/lmlab_text/word_perplexity": text["word_perplexity,none"],
    }


@pytest.mark.parametrize("dora", [False, True], ids=["rslora", "dora"])
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # transformers, in lm-eval's peft path
def test_an_lmlab_adapter_in_process_scores_as_its_peft_export_in_lm_evals_own_path(model_dir, task_dir, tmp_path,
                                                                                    dora):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from lmlab.eval.harness import lm_eval_scores, run_lm_eval
    from lmlab.hylorada import HyLoRADAConfig, apply_hylorada, export_peft, load_adapter, merge_adapter, save_adapter
    from lmlab.models.hf import load_causal_lm, load_tokenizer

    model = apply_hylorada(load_causal_lm(str(model_dir)),
                           HyLoRADAConfig(r=4, alpha=8, use_dora=dora, position_bias=False, landmarks="none",
                                          dropout=0.0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained adapter's stand-in: B away from 0 (and the DoRA magnitudes moved)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
            elif "lora_magnitude" in name:
                param.mul_(1 + 0.5 * torch.randn(param.shape, generator=gen).abs())
    save_adapter(model, tmp_path / "adapter")
    export_peft(model, tmp_path / "peft")
    tokenizer = load_tokenizer(str(model_dir))

    def ours(m) -> dict:
        return lm_eval_scores(run_lm_eval(m, tokenizer, TASKS, include_path=str(task_dir), bootstrap_iters=0))

    unmerged = ours(load_adapter(load_causal_lm(str(model_dir)), tmp_path / "adapter"))
    merged = ours(merge_adapter(load_adapter(load_causal_lm(str(model_dir)), tmp_path / "adapter")))
    base = ours(load_causal_lm(str(model_dir)))
    lm = HFLM(pretrained=str(model_dir), peft=str(tmp_path / "peft"), device="cpu", batch_size=8)
    theirs = lm_eval_scores(simple_evaluate(lm, tasks=TASKS, bootstrap_iters=0, log_samples=False,
                                            task_manager=TaskManager(include_path=str(task_dir),
                                                                     include_defaults=False)))
    bpb = "lm_eval/lmlab_text/bits_per_byte"
    assert abs(unmerged[bpb] / base[bpb] - 1) > 1e-3  # the adapter changes what the model predicts
    assert set(unmerged) == set(merged) == set(theirs) == set(base) and len(theirs) == 5
    for name, value in theirs.items():
        assert unmerged[name] == pytest.approx(value, rel=1e-6, abs=1e-6), name
        assert merged[name] == pytest.approx(value, rel=1e-6, abs=1e-6), name


def test_a_study_scores_every_cell_with_lm_eval_and_reports_the_paired_change(task_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("run", "hylorada", "--preset", "smoke", "--out", str(out), "--quiet", "--seeds", "1",
                   "only=[base]", "retrieval_docs=0", "positional_windows=0", f"lm_eval.tasks=[{','.join(TASKS)}]",
                   f"lm_eval.include_path={task_dir}", "lm_eval.limit=4", env=OFFLINE)
    assert proc.returncode == 0, proc.stderr
    names = {"lm_eval/lmlab_choice/acc", "lm_eval/lmlab_choice/acc_norm", "lm_eval/lmlab_text/bits_per_byte",
             "lm_eval/lmlab_text/byte_perplexity", "lm_eval/lmlab_text/word_perplexity"}
    rows = {r["config"]: r for r in read_jsonl(out / "results.jsonl")}
    assert set(rows) == {"base", "lora"}  # the base cell trains nothing and is scored too
    for row in rows.values():
        assert row["status"] == "ok" and names <= set(row["metrics"]), row
        assert all(math.isfinite(row["metrics"][n]) for n in names)
    assert rows["base"]["metrics"]["lm_eval/lmlab_text/bits_per_byte"] != \
        rows["lora"]["metrics"]["lm_eval/lmlab_text/bits_per_byte"]
    summary = json.loads((out / "summary.json").read_text())
    assert names <= set(summary["configs"]["lora"]["metrics"])
    assert names <= set(summary["configs"]["base"]["vs_reference"])  # paired by seed with the reference (lora)
    report = (out / "report.md").read_text()
    section = report.split("## lm-evaluation-harness", 1)[1].split("\n## ", 1)[0]
    assert "lmlab_text/bits_per_byte" in section and "change vs lora" in section and "| base |" in section


def test_the_include_path_is_checked_and_recorded_absolute_at_config_time(task_dir, tmp_path, monkeypatch):
    from lmlab.config import load_config, preset_path
    from lmlab.studies.hylorada_study import HyloradaStudyConfig

    monkeypatch.chdir(task_dir.parent)
    cfg = load_config(HyloradaStudyConfig, preset_path("hylorada", "smoke"),
                      ["lm_eval.tasks=[lmlab_choice]", f"lm_eval.include_path={task_dir.name}"])
    assert cfg.lm_eval.include_path == str(task_dir.resolve()) and cfg.lm_eval.batch_size == 8
    with pytest.raises(ConfigError, match=r"^lm_eval\.include_path = 'nowhere': nowhere is not a directory"):
        load_config(HyloradaStudyConfig, preset_path("hylorada", "smoke"),
                    ["lm_eval.tasks=[lmlab_choice]", "lm_eval.include_path=nowhere"])


def test_an_unknown_task_or_missing_data_is_one_line_before_anything_trains(model_dir, task_dir, tmp_path, capsys):
    code = main(["eval", "lm-eval", "--model", str(model_dir), "--tasks", "lmlab_choise", "--include-path",
                 str(task_dir)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("lmlab: error: lm-eval has no task 'lmlab_choise'; did you mean 'lmlab_choice'?")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "gone.yaml").write_text((task_dir / "choice.yaml").read_text().replace(
        "task: lmlab_choice", "task: lmlab_gone").replace(str(task_dir / "choice.jsonl"), str(broken / "no.jsonl")))
    code = main(["eval", "lm-eval", "--model", str(model_dir), "--tasks", "lmlab_gone", "--include-path", str(broken)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("lmlab: error: lm-eval could not load task(s) lmlab_gone: FileNotFoundError: ") and \
        str(broken / "no.jsonl") in err
    out = tmp_path / "run"  # a study stops before its first cell (lm-eval's task index is reused in the process)
    code = main(["run", "hylorada", "--preset", "smoke", "--out", str(out), "--quiet", "--seeds", "1",
                 "lm_eval.tasks=[no_such_task]", f"lm_eval.include_path={task_dir}"])
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines()[-1].startswith("lmlab: error: lm-eval has no task 'no_such_task'"), err
    assert not (out / "results.jsonl").exists()


def test_without_lm_eval_installed_the_error_names_the_extra(model_dir, task_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` meets where it is not installed
    code = main(["eval", "lm-eval", "--model", str(model_dir), "--tasks", "lmlab_choice"])
    assert code == 2
    assert capsys.readouterr().err == "lmlab: error: lm-eval is not installed: pip install 'lmlab[lmeval]'\n"
    from lmlab.eval.harness import run_lm_eval

    with pytest.raises(ConfigError, match=r"lm-eval is not installed: pip install 'lmlab\[lmeval\]'"):
        run_lm_eval(None, None, ["lmlab_choice"], include_path=str(task_dir))
