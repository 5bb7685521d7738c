"""The sharp edges a new user hit (issue 18): one process per run directory and duplicated cells dropped by the
report; bounds on max_length; bad --nproc and model config.json files; a run stopped by bad input leaves no
directory behind; --resume refuses new settings; short keys and empty files in presets; files that respect the
umask; and the run's messages (no library warning, one "report:" line, an interrupt message naming the run, a
progress line with an ETA, bars for slow evaluation)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from helpers import ONE_THREAD, run_cli, save_tiny_model
from lmlab import progress as bars
from lmlab.config import load_config
from lmlab.errors import ConfigError
from lmlab.fileio import atomic_write_text
from lmlab.studies.rundir import RunDir
from test_reliability_checkpoints import TEXT, cli, one_error_line

pytestmark = pytest.mark.xdist_group("new-user-edges")

REPO = Path(__file__).resolve().parents[1]
# The MU smoke study on its reference configuration only: two cells of a few seconds each.
MU_RUN = ["run", "mu", "--preset", "smoke", "--seeds", "2", "--quiet", "only=[dense]"]


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def mu_run(tmp_path_factory) -> tuple[Path, str]:
    """A finished two-cell MU run and its stderr."""
    out = tmp_path_factory.mktemp("edges-mu") / "run"
    proc = run_cli(*MU_RUN, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out, proc.stderr


@pytest.fixture
def mu_copy(mu_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(mu_run[0], run)
    return run


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A saved 2-layer Llama (64 positions) with its tokenizer."""
    return save_tiny_model(tmp_path_factory.mktemp("edges-model") / "model", texts=[TEXT] * 4)


def edited_model(tiny_model: Path, directory: Path, **fields) -> Path:
    shutil.copytree(tiny_model, directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(fields)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


# ---------------------------------------------------------------------------------------------------
# 2. One process per run directory; duplicated cells are dropped by the report, which says which


def test_a_second_process_on_a_run_directory_exits_2_naming_the_holder(capsys, mu_copy):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom lmlab.studies.rundir import RunDir\n"
         "RunDir(sys.argv[1]).lock()\nprint('locked', flush=True)\ntime.sleep(120)\n", str(mu_copy)],
        stdout=subprocess.PIPE, text=True, env=ONE_THREAD)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = (mu_copy / "results.jsonl").read_text()
        code, out, err = cli(capsys, "run", "mu", "--resume", str(mu_copy))
        assert code == 2 and out == ""
        line = one_error_line(err)
        assert f"run directory {mu_copy} is in use by another lmlab process (pid {holder.pid} on " in line
        assert "started 20" in line and f"--resume {mu_copy}" in line
        assert (mu_copy / "results.jsonl").read_text() == before
    finally:
        holder.kill()
        holder.wait()
    # killed, however abruptly: its lock is gone with it
    code, _, err = cli(capsys, "run", "mu", "--resume", str(mu_copy), "--quiet")
    assert code == 0, err


def test_report_keeps_the_first_row_of_a_duplicated_cell_and_says_which(capsys, mu_copy):
    rows = rows_of(mu_copy)
    duplicate = {**rows[0], "metrics": {k: 1e6 for k in rows[0]["metrics"]}}
    with open(mu_copy / "results.jsonl", "a") as f:
        f.write(json.dumps(duplicate) + "\n" + json.dumps(duplicate) + "\n")
    code, _, err = cli(capsys, "report", str(mu_copy))
    assert code == 0, err
    report = (mu_copy / "report.md").read_text()
    assert "Cells finished: 2 of 2." in report
    assert "2 duplicate row(s) in `results.jsonl` were dropped** (dense seed 42)" in report
    summary = json.loads((mu_copy / "summary.json").read_text())
    assert summary["configs"]["dense"]["n_ok"] == 2
    first = [r["metrics"]["test_ppl"] for r in rows]
    assert summary["configs"]["dense"]["metrics"]["test_ppl"]["mean"] == pytest.approx(sum(first) / 2)


def test_cells_finished_never_exceeds_the_cells_of_the_run():
    record = {"configurations": ["a", "b"], "seeds": [1]}
    rows = [{"config": "a", "seed": 1}, {"config": "a", "seed": 1}, {"config": "c", "seed": 1},
            {"config": "b", "seed": 2}]
    assert RunDir.count_cells(rows, record) == 1


# ---------------------------------------------------------------------------------------------------
# 4. max_length within what the model and data serve; progress on slow preparation


def test_max_length_far_beyond_the_tiny_base_exits_2_at_once(capsys, tmp_path):
    out = tmp_path / "run"
    code, _, err = cli(capsys, "run", "hylorada", "--preset", "smoke", "--out", str(out), "max_length=100000000")
    assert code == 2
    assert "max_length=100000000 is more than 32x the 32-token context of the tiny base" in one_error_line(err)
    assert "use max_length=1024 or less" in err and not out.exists()


def test_max_length_far_beyond_a_saved_model_exits_2_before_building_data(capsys, tmp_path, tiny_model):
    out = tmp_path / "run"
    code, _, err = cli(capsys, "run", "hylorada", "--preset", "smoke", "--quiet", "--out", str(out),
                       f"model={tiny_model}", "max_length=100000")
    assert code == 2
    assert f"max_length=100000 is more than 32x the 64-token context of model {tiny_model}" in one_error_line(err)
    assert not out.exists()  # checked after the directory was claimed: the claim is withdrawn


def test_slow_preparation_and_evaluation_show_bars_only_when_progress_is_on(capsys, monkeypatch, tiny_model):
    from lmlab.data import generators
    from lmlab.eval.perplexity import evaluate_perplexity
    from lmlab.models.hf import load_causal_lm, load_tokenizer

    monkeypatch.setattr(bars, "DELAY", 0.0)  # as if each took longer than the delay
    model, tokenizer = load_causal_lm(str(tiny_model)), load_tokenizer(str(tiny_model))
    generators.long_documents(1, 3, 40)
    evaluate_perplexity(model, [TEXT], tokenizer, 32, batch_size=2)
    assert capsys.readouterr().err == ""
    with bars.enabled():
        generators.long_documents(1, 3, 40)
        evaluate_perplexity(model, [TEXT], tokenizer, 32, batch_size=2)
    err = capsys.readouterr().err
    assert "building documents of 40 tokens" in err and "evaluating" in err


# ---------------------------------------------------------------------------------------------------
# 5. --nproc and a model's config.json: exit 2 with one line


@pytest.mark.parametrize("value", ["abc", "0", "-3"])
def test_bad_nproc_exits_2_with_one_line(capsys, tmp_path, value):
    code, out, err = cli(capsys, "run", "hylorada", "--preset", "smoke", "--out", str(tmp_path / "run"),
                         "--nproc", value)
    assert code == 2 and out == ""
    assert f"--nproc must be a positive integer or 'auto', got '{value}'" in one_error_line(err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("hidden_size", "abc", "Field 'hidden_size' expected int, got str (value: 'abc')"),
    ("num_attention_heads", None, "Field 'num_attention_heads' expected int, got NoneType"),
    ("vocab_size", [1], "Field 'vocab_size' expected int, got list"),
])
def test_model_config_with_a_wrong_typed_field_exits_2_with_one_line(capsys, tmp_path, tiny_model, field, value,
                                                                     expected):
    model = edited_model(tiny_model, tmp_path / "model", **{field: value})
    data = tmp_path / "d.txt"
    data.write_text(TEXT)
    code, out, err = cli(capsys, "eval", "ppl", "--model", str(model), "--data", str(data), "--max-length", "32")
    assert code == 2 and out == ""
    line = one_error_line(err)
    assert f"{model}: unusable config.json ({expected}" in line and "fix that field" in line
    code, _, err = cli(capsys, "run", "hylorada", "--preset", "smoke", "--quiet", "--out", str(tmp_path / "run"),
                       f"model={model}")
    assert code == 2 and expected in one_error_line(err)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------
# 6. A run stopped by bad input after claiming its directory leaves nothing behind; computed work stays


def test_a_run_stopped_by_bad_data_leaves_no_directory_behind(capsys, tmp_path):
    out = tmp_path / "run"
    args = ["run", "mu", "--preset", "smoke", "--seeds", "1", "--quiet", "only=[dense]", "--out", str(out)]
    code, _, err = cli(capsys, *args, "max_seq_len=100000")
    assert code == 2 and "has fewer tokens than max_seq_len=100000" in one_error_line(err)
    assert not out.exists()  # so the corrected command may use the same --out
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, _ = cli(capsys, *args[:-1], str(empty), "max_seq_len=100000")
    assert code == 2 and empty.is_dir() and list(empty.iterdir()) == []  # a directory the user made stays


def test_withdrawing_a_claim_never_removes_computed_work(tmp_path):
    run = RunDir(tmp_path / "run")
    run.create()
    run.lock()
    run.append_result({"config": "a", "seed": 1, "status": "ok", "metrics": {}})
    run.withdraw()
    assert run.study_path.exists() and run.results_path.exists()
    run.unlock()
    other = RunDir(tmp_path / "other")
    other.create()
    (other.root / "lr_tuning.json").write_text("{}")
    other.withdraw()
    assert (other.root / "lr_tuning.json").exists() and other.study_path.exists()


# ---------------------------------------------------------------------------------------------------
# 7. --resume refuses --preset and --out like overrides and --seeds


@pytest.mark.parametrize("extra", [["--preset", "smoke"], ["--out", "elsewhere"], ["--preset", "default",
                                                                                    "--seeds", "3"]])
def test_resume_refuses_preset_and_out(capsys, mu_copy, extra):
    stamp = (mu_copy / "report.md").stat().st_mtime_ns
    code, out, err = cli(capsys, "run", "mu", "--resume", str(mu_copy), *extra)
    assert code == 2 and out == ""
    line = one_error_line(err)
    assert "--resume continues a run in its own directory with its saved configuration (study.yaml, preset " \
           "'smoke'); drop " in line
    assert all(f"{flag}" in line for flag in extra if flag.startswith("--"))
    assert (mu_copy / "report.md").stat().st_mtime_ns == stamp and not Path("elsewhere").exists()


# ---------------------------------------------------------------------------------------------------
# 10-11. Presets: short keys as on the command line; a bad command-line value names the command line; no empty file


def test_preset_file_accepts_the_short_keys_of_the_command_line(tmp_path):
    from lmlab.studies.hylorada_study import HyloradaStudyConfig

    preset = tmp_path / "my.yaml"
    preset.write_text("extends: hylorada/smoke\nlearning_rate: 0.1\nepochs: 2\nr: 8\n")
    cfg = load_config(HyloradaStudyConfig, preset)
    assert (cfg.train.lr, cfg.train.epochs, cfg.adapter.r) == (0.1, 2, 8)
    assert cfg.train.batch_size == 8  # the rest of the parent's train section is kept
    preset.write_text("extends: hylorada/smoke\nlearning_rate: 0.1\ntrain: {lr: 0.2}\n")
    with pytest.raises(ConfigError, match=r"'learning_rate' and 'train.lr' are the same setting"):
        load_config(HyloradaStudyConfig, preset)


def test_a_bad_command_line_value_names_the_command_line_not_the_preset(capsys, tmp_path):
    code, _, err = cli(capsys, "run", "hylorada", "--preset", "smoke", "--out", str(tmp_path / "run"),
                       "train.lr=fast")
    line = one_error_line(err)
    assert code == 2 and "train.lr = 'fast'" in line and line.endswith("(on the command line)")
    assert "smoke.yaml" not in line
    code, _, err = cli(capsys, "run", "hylorada", "--preset", "smoke", "--out", str(tmp_path / "run"), "lr=fast")
    assert code == 2 and one_error_line(err).endswith("(on the command line)")


@pytest.mark.parametrize("text", ["", "\n\n", "# my preset, to be written\n"], ids=["empty", "blank", "comments"])
def test_an_empty_preset_file_is_refused(capsys, tmp_path, text):
    preset = tmp_path / "my.yaml"
    preset.write_text(text)
    code, _, err = cli(capsys, "run", "hylorada", "--preset", str(preset), "--out", str(tmp_path / "run"))
    assert code == 2 and f"preset file {preset} is empty" in one_error_line(err)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------
# 12. Files respect the umask


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_respect_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "out.txt", "x")
    finally:
        os.umask(previous)
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_runs_result_files_respect_the_umask(mu_run):
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("results.jsonl", "study.yaml", "summary.json", "report.md"):
        assert (mu_run[0] / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


# ---------------------------------------------------------------------------------------------------
# 15. Messages: no library warning, one "report:" line, an interrupt message naming the run, ETA and README


def test_greedy_generation_gives_no_past_key_values_warning():
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmlab.eval.generation import greedy_generate

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=32)).eval()
    ids = torch.randint(3, 50, (2, 5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        greedy_generate(model, torch.ones_like(ids), 3, input_ids=ids)
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_only_the_main_process_prints_the_report_line(capsys, monkeypatch, tmp_path):
    """Under torchrun every rank runs the CLI; after the process group is shut down every rank is 'rank 0'."""
    from lmlab.engine import distributed as D
    from lmlab.studies import runner

    state = {"rank": 1}
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(D, "init_from_env", lambda: True)
    monkeypatch.setattr(D, "is_main", lambda: state["rank"] == 0)
    monkeypatch.setattr(D, "shutdown", lambda: state.update(rank=0))
    monkeypatch.setattr(runner, "run_study", lambda *a, **k: tmp_path)
    code, out, _ = cli(capsys, "run", "mu")
    assert code == 0 and out == ""
    state["rank"] = 0
    code, out, _ = cli(capsys, "run", "mu")
    assert code == 0 and out == f"report: {tmp_path / 'report.md'}\n"


def test_the_interrupt_message_names_the_study_and_the_directory(capsys, monkeypatch, tmp_path):
    from lmlab.studies import runner

    def interrupted(*args, **kwargs):
        raise runner.StudyInterrupted(signal.SIGTERM)

    monkeypatch.setattr(runner, "_execute", interrupted)
    out = tmp_path / "my run"
    code, _, err = cli(capsys, "run", "mu", "--preset", "smoke", "--out", str(out))
    assert code == 128 + signal.SIGTERM
    assert err == f"lmlab: interrupted; finished cells are kept - continue with `lmlab run mu --resume '{out}'`\n"
    assert (out / "study.yaml").exists()  # an interrupted run keeps its directory to resume


def test_each_cell_line_shows_the_time_left(mu_run):
    _, stderr = mu_run
    first = next(line for line in stderr.splitlines() if line.startswith("[1/2] dense seed 42: "))
    last = next(line for line in stderr.splitlines() if line.startswith("[2/2] dense seed 123: "))
    assert re.search(r"\(\d+s, eta (\d+s|\d+m\d\ds)\)$", first), first
    assert re.search(r"\(\d+s\)$", last), last  # nothing left


def test_duration_text():
    from lmlab.studies.runner import duration_text

    assert [duration_text(s) for s in (4.4, 59.6, 130, 3600 * 2 + 65)] == ["4s", "1m00s", "2m10s", "2h01m"]


def test_readme_gives_the_smoke_presets_real_duration():
    readme = (REPO / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `smoke` |"))
    assert "| seconds |" not in row and "10-30 s" in row


def test_a_shape_mismatch_between_weights_and_config_names_the_tensor(capsys, tmp_path, tiny_model):
    model = edited_model(tiny_model, tmp_path / "model", intermediate_size=128)
    data = tmp_path / "d.txt"
    data.write_text(TEXT)
    code, _, err = cli(capsys, "eval", "ppl", "--model", str(model), "--data", str(data), "--max-length", "32")
    line = one_error_line(err)
    assert code == 2 and "above report" not in line
    assert re.search(rf"the weights of {re.escape(str(model))} do not fit its config.json: tensor "
                     r"'model\.layers\.0\.mlp\.\w+_proj\.weight' is \[\d+, \d+\] in the weights but \[\d+, \d+\] by "
                     r"config.json \(6 tensor\(s\) differ\)", line), line
