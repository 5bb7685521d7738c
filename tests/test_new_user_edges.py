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


# ---------------------------------------------------------------------------------------------------
# 6. --nproc N: every input check before the N processes start (one line, exit 2, nothing started)


@pytest.mark.parametrize("case", ["existing out", "file out", "seeds 0", "parallel", "slurm without executor",
                                  "resume with overrides", "seeds twice", "empty out"])
def test_bad_input_with_nproc_is_one_line_before_any_process_starts(capsys, tmp_path, monkeypatch, case):
    """Under --nproc 2 the input is checked in this process before torchrun starts two ranks; before, most checks
    ran in every rank: the line twice, torchrun's traceback and exit 1. A started launcher would fail this test
    (subprocess.call is replaced by one that records it)."""
    import lmlab.cli as cli_module

    started = []
    monkeypatch.setattr(cli_module, "_relaunch_distributed", lambda n, argv: started.append(argv) or 0)
    monkeypatch.setenv("LMLAB_DEVICE", "cpu")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("x")
    afile = tmp_path / "afile"
    afile.write_text("x")
    base = ["run", "hylorada", "--preset", "smoke", "--seeds", "1", "--nproc", "2"]
    args, expected = {
        "existing out": (base + ["--out", str(used)], "already exists and is not empty; continue it with --resume"),
        "file out": (base + ["--out", str(afile)], "is a file, not a directory; choose another --out"),
        "seeds 0": (["run", "hylorada", "--preset", "smoke", "--seeds", "0", "--nproc", "2", "--out",
                     str(tmp_path / "r")], "--seeds must be >= 1, got 0"),
        "parallel": (base + ["--parallel", "2", "--out", str(tmp_path / "r")],
                     "they do not combine with --nproc (DDP): drop one of them"),
        "slurm without executor": (base + ["--slurm-partition", "gpu", "--out", str(tmp_path / "r")],
                                   "add --executor slurm"),
        "resume with overrides": (["run", "hylorada", "--resume", str(used), "--nproc", "2", "train.lr=1e-3"],
                                  "has no study.yaml"),
        "seeds twice": (base + ["--out", str(tmp_path / "r"), "seeds=[7]"],
                        "--seeds 1 and the override seeds=... both choose the seeds; drop one"),
        "empty out": (base + ["--out", ""], "--out '' names no directory"),
    }[case]
    code, out, err = cli(capsys, *args)
    assert code == 2 and out == "" and started == []
    assert expected in one_error_line(err)
    assert not (tmp_path / "r").exists() and (used / "keep.txt").read_text() == "x"


def test_nproc_above_the_cores_is_refused_on_the_cpu(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("LMLAB_DEVICE", "cpu")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    code, out, err = cli(capsys, "run", "hylorada", "--preset", "smoke", "--nproc", "64", "--out", str(tmp_path / "r"))
    assert code == 2 and out == ""
    assert one_error_line(err) == ("lmlab: error: --nproc 64 starts 64 processes on the CPU, but this process may "
                                   "use 2 core(s): use --nproc 2 or fewer")


def test_torchrun_hands_every_lmlab_option_to_the_ranks(monkeypatch):
    """lmlab's arguments after `--`: torchrun's own parser (its real one, not a copy) leaves them all to the script,
    `--log` included, which it would otherwise read as an ambiguous abbreviation of its `--log-dir`; the rank drops
    the `--` if torchrun passes it on."""
    import subprocess as sp

    from torch.distributed.run import get_args_parser

    import lmlab.cli as cli_module

    seen = []
    monkeypatch.setattr(sp, "call", lambda cmd: seen.append(cmd) or 0)
    argv = ["run", "mu", "--preset", "smoke", "--nproc", "2", "--log", "tensorboard", "--log=mlflow", "lr=1e-3"]
    assert cli_module._relaunch_distributed(2, argv) == 0
    cmd = seen[0]
    parsed = get_args_parser().parse_args(cmd[cmd.index("torch.distributed.run") + 1:])
    assert parsed.module and parsed.training_script == "lmlab.cli" and parsed.nproc_per_node == "2"
    given = list(parsed.training_script_args)
    assert given[given[:1] == ["--"]:] == ["run", "mu", "--preset", "smoke", "--log", "tensorboard", "--log=mlflow",
                                           "lr=1e-3"]


def test_bad_lmlab_device_is_the_only_line(capsys, monkeypatch, tmp_path):
    """LMLAB_DEVICE=cuda on a machine without CUDA: refused before the run says anything (the CPU-share note
    included)."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setenv("LMLAB_DEVICE", "cuda")
    code, out, err = cli(capsys, "run", "hylorada", "--preset", "smoke", "--seeds", "1", "--out", str(tmp_path / "r"))
    assert code == 2 and out == ""
    assert "LMLAB_DEVICE=cuda, but torch sees no CUDA device" in one_error_line(err)
    assert not (tmp_path / "r").exists()


def test_the_seeds_a_run_uses_are_the_ones_its_config_records():
    """--seeds N replaces the preset's seeds in the run's config (study.yaml's config.seeds, which the Setting
    section reads), not only in the list of cells; a preset's one `seed` yields to it too."""
    from lmlab.studies.runner import check_run

    plan = check_run("hylorada", preset="smoke", seeds=1)
    assert plan.record["seeds"] == [42] and plan.cfg.seeds == [42]
    plan = check_run("hylorada", preset="smoke", seeds=2, overrides=["train.lr=1e-3"])
    assert plan.cfg.seeds == [42, 123] and plan.cfg.train.lr == 1e-3
    assert check_run("hylorada", preset="smoke", overrides=["seed=7"]).cfg.seeds == [7]
    with pytest.raises(ConfigError, match=r"^--seeds 2 and the override seed=\.\.\. both choose the seeds; drop one$"):
        check_run("hylorada", preset="smoke", seeds=2, overrides=["seed=7"])


# ---------------------------------------------------------------------------------------------------
# 7. report, bench, summarize-eval and overrides: bad input that used to pass or crash


def test_report_refuses_a_run_whose_results_are_gone_and_leaves_out_rows_of_cells_it_does_not_have(capsys,
                                                                                                   mu_copy):
    report = (mu_copy / "report.md").read_text()
    results = (mu_copy / "results.jsonl").read_text()
    (mu_copy / "results.jsonl").unlink()
    code, out, err = cli(capsys, "report", str(mu_copy))
    assert code == 2 and out == ""
    assert "results.jsonl is missing: the report is built from it" in one_error_line(err)
    assert (mu_copy / "report.md").read_text() == report  # the report of the finished cells is kept
    rows = [json.loads(line) for line in results.splitlines() if line.strip()]
    stray = {**rows[0], "config": "nosuchcfg", "metrics": {k: 1e6 for k in rows[0]["metrics"]}}
    (mu_copy / "results.jsonl").write_text(results + json.dumps(stray) + "\n")
    code, _, err = cli(capsys, "report", str(mu_copy))
    assert code == 0, err
    text = (mu_copy / "report.md").read_text()
    assert ("1 row(s) in `results.jsonl` are for cells this run does not have and were left out** (nosuchcfg "
            "seed") in text
    assert "| nosuchcfg |" not in text and "nosuchcfg" not in (mu_copy / "summary.json").read_text()
    assert "nosuchcfg" in (mu_copy / "results.jsonl").read_text()  # the file itself is never rewritten


def test_report_on_a_missing_directory_says_it_does_not_exist(capsys, tmp_path):
    code, _, err = cli(capsys, "report", str(tmp_path / "nope"))
    assert code == 2
    assert f"{tmp_path / 'nope'} does not exist: give the directory of an lmlab run" in one_error_line(err)


@pytest.mark.parametrize("case", ["out is a file", "out below a file", "only names nothing", "unknown name"])
def test_bench_refuses_bad_options_before_measuring(capsys, tmp_path, monkeypatch, case):
    """Before, `--out FILE` measured for minutes and then crashed with two tracebacks, losing the numbers, and a
    bare `--only` ran the whole suite."""
    import lmlab.bench as bench

    monkeypatch.setattr(bench, "_child", lambda *a, **k: pytest.fail("the benchmarks started"))
    afile = tmp_path / "afile"
    afile.write_text("x")
    args, expected = {"out is a file": (["--out", str(afile)], f"cannot write benchmark results to {afile}"),
                      "out below a file": (["--out", str(afile / "sub")], "cannot write benchmark results to"),
                      "only names nothing": (["--only"], "--only names no benchmark: give one or more of"),
                      "unknown name": (["--only", "nosuch", "--out", str(tmp_path / "new")],
                                       "unknown benchmark(s) nosuch")}[case]
    code, out, err = cli(capsys, "bench", "--quick", *args)
    assert code == 2 and out == "" and expected in one_error_line(err)
    assert not (tmp_path / "new").exists()  # refused before the results directory is made


@pytest.mark.parametrize(("content", "expected"), [
    (b"caf\xe9\n", "is not UTF-8 text (byte 0xe9 at offset 3)"),
    (b'{"systems": {"bridged": {"flexible": "x", "correct_flexible": "false"}}}\n', ":1: not an eval_samples line"),
    (b'{"systems": {"bridged": {"flexible": 3, "correct_flexible": true}}}\n', ":1: not an eval_samples line"),
    (b'{"systems": {"bridged": {"flexible": null, "correct_flexible": true}}}\n', ":1: not an eval_samples line"),
    (b"\n\n", "no eval samples in it (empty)"),
])
def test_summarize_eval_refuses_files_that_are_not_eval_samples(capsys, tmp_path, content, expected):
    path = tmp_path / "eval_samples.jsonl"
    path.write_bytes(content)
    code, out, err = cli(capsys, "summarize-eval", str(path))
    assert code == 2 and out == "" and expected in one_error_line(err)


@pytest.mark.parametrize("override", ["adapter.r=true", "train.epochs=true", "train.lr=false",
                                      "train.loss_chunk=true", "seeds=[true]"])
def test_a_boolean_for_a_number_is_refused(capsys, tmp_path, override):
    """pydantic would read true as 1: `adapter.r=true` trained at rank 1 without a word, `train.loss_chunk=true`
    (an int inside Annotated, in a union with a literal) took one-token chunks, `seeds=[true]` ran seed 1."""
    code, out, err = cli(capsys, "run", "hylorada", "--preset", "smoke", "--out", str(tmp_path / "r"), override)
    key = override.split("=")[0]
    assert code == 2 and out == "" and f"{key} = " in one_error_line(err)
    assert re.search(r"expected (a number|numbers), got (true|false)", one_error_line(err))
    assert not (tmp_path / "r").exists()
    from lmlab.config import preset_path
    from lmlab.studies.registry import get_study

    cfg = load_config(get_study("hylorada").config_cls, preset_path("hylorada", "smoke"), ["adapter.use_rslora=true"])
    assert cfg.adapter.use_rslora is True  # a boolean field still takes one


@pytest.mark.parametrize(("args", "expected"), [
    (("run",), "name a study: `lmlab run STUDY [KEY=VALUE ...]`, STUDY one of hylorada, landmarks"),
    (("eval",), "name what to evaluate: `lmlab eval ppl ...` (perplexity) or `lmlab eval lm-eval ...`"),
    (("run", "mu", "--preset", "smoke", "train.lr"), "(a config override is KEY=VALUE, e.g. train.lr=...)"),
    (("run", "mu", "--preset", "smoke", "=5"), "override '=5' has no key before its '='"),
])
def test_usage_errors_say_what_to_give(capsys, args, expected):
    code, out, err = cli(capsys, *args)
    assert code == 2 and out == "" and expected in one_error_line(err)


def test_a_preset_that_extends_a_missing_one_names_its_file_and_the_presets(capsys, tmp_path):
    preset = tmp_path / "mine.yaml"
    preset.write_text("extends: hylorada/smokee\ntrain:\n  lr: 0.001\n")
    code, out, err = cli(capsys, "run", "hylorada", "--preset", str(preset), "--out", str(tmp_path / "r"))
    line = one_error_line(err)
    assert code == 2 and out == "" and f"{preset}: 'extends: hylorada/smokee' names no preset" in line
    assert "hylorada's presets are default, paper, smoke" in line and not (tmp_path / "r").exists()


def test_a_pickle_named_like_safetensors_is_called_a_pickle_and_never_unpickled(capsys, tmp_path, tiny_model):
    """torch.save output renamed model.safetensors: not "truncated or corrupt" but a pickle, with the conversion."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    from test_reliability_security import hostile_pickle

    data = tmp_path / "d.txt"
    data.write_text(TEXT)
    marker = tmp_path / "pwned"
    for content in (b"torch.save", hostile_pickle(marker)):  # torch.save's zip of pickles, and a raw live pickle
        if content == b"torch.save":
            torch.save({"w": torch.zeros(2)}, model / "model.safetensors")
        else:
            (model / "model.safetensors").write_bytes(content)
        code, out, err = cli(capsys, "eval", "ppl", "--model", str(model), "--data", str(data), "--max-length", "32")
        line = one_error_line(err)
        assert code == 2 and out == "" and "model.safetensors is a pickle (torch.save), not safetensors" in line
        assert "save_pretrained(dir, safe_serialization=True)" in line
    assert not marker.exists()


def test_a_truncated_safetensors_file_whose_header_length_starts_like_a_pickle_is_called_truncated(tmp_path):
    """A safetensors file starts with its header's length: 640 = 0x280 makes its first byte 0x80, a pickle's PROTO.
    The JSON header after the length tells them apart."""
    import struct

    from lmlab.errors import CheckpointError
    from lmlab.models.hf import check_weight_files

    header = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    header += b" " * (640 - len(header))
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 100)
    assert (tmp_path / "model.safetensors").read_bytes()[0] == 0x80
    with pytest.raises(CheckpointError, match="is not a readable safetensors file .* truncated or corrupt"):
        check_weight_files(tmp_path)


def test_resume_with_overrides_under_nproc_is_refused_before_any_process_starts(capsys, monkeypatch, mu_copy):
    import lmlab.cli as cli_module

    started = []
    monkeypatch.setattr(cli_module, "_relaunch_distributed", lambda n, argv: started.append(argv) or 0)
    monkeypatch.setenv("LMLAB_DEVICE", "cpu")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    before = (mu_copy / "results.jsonl").read_text()
    code, out, err = cli(capsys, "run", "mu", "--resume", str(mu_copy), "--nproc", "2", "train.lr=1e-3")
    assert code == 2 and out == "" and started == []
    assert "--resume continues a run in its own directory with its saved configuration" in one_error_line(err)
    assert "drop the overrides" in one_error_line(err) and (mu_copy / "results.jsonl").read_text() == before
