"""Bad configs and bad usage through the command line: exit 2, one line naming the key, the value and the rule
(and for an unknown key the closest valid one), no traceback, and nothing written to disk."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from test_reliability_checkpoints import cli, one_error_line

RUN = ("run", "hylorada", "--preset", "smoke", "--quiet")

BAD_OVERRIDES = {
    "wrong-type": (["train.lr=fast"], "train.lr = 'fast': Input should be a valid number"),
    "wrong-type-list": (["only=lora"], "only = 'lora': Input should be a valid list"),
    "below-range": (["adapter.r=0"], "adapter.r = 0: Input should be greater than or equal to 1"),
    "above-range": (["adapter.dropout=1.5"], "adapter.dropout = 1.5: Input should be less than 1"),
    "infinite": (["train.lr=.inf"], "train.lr = inf: Input should be a finite number"),
    "overflowing": (["train.lr=1e999"], "train.lr = '1e999': Input should be a finite number"),
    "not-a-number": (["adapter.alpha=.nan"], "adapter.alpha = nan: Input should be a finite number"),
    "choice": (["rope_scaling=cubic"], "rope_scaling = 'cubic': Input should be 'none', 'linear', 'dynamic' or 'yarn'"),
    "cross-field": (["max_length=16"], "max_length=16 is shorter than the tiny base's pretraining context (32)"),
    "unknown-key": (["adapter.rank=8"],
                    "unknown key 'adapter.rank' in the command-line overrides; did you mean 'adapter.r'?"),
    "unknown-alias": (["epoch=2"], "unknown key 'epoch' in the command-line overrides; did you mean 'epochs'?"),
    "key-below-a-leaf": (["train.lr.max=3"],
                         "unknown key 'train.lr.max' in the command-line overrides; did you mean 'train.lr'?"),
    "empty-key": (["=3"], "override '=3' has no key before its '=': write key=value, e.g. train.lr=1e-4"),
    "unknown-key-in-a-mapping": (["adapter={rr: 3}"], "unknown key 'adapter.rr' in HyloradaStudyConfig"),
    "section-as-scalar": (["adapter=3"], "adapter = 3: Input should be a valid dictionary"),
    "unknown-configuration": (["only=[lora,dora]"], "only=['dora'] names no configuration of study 'hylorada'"),
    "not-key-value": (["lr"], "unrecognized arguments: lr"),
}


@pytest.mark.parametrize("case", list(BAD_OVERRIDES))
def test_bad_override_exits_2_with_one_line_and_writes_nothing(capsys, tmp_path, case):
    overrides, expected = BAD_OVERRIDES[case]
    out = tmp_path / "run"
    code, stdout, err = cli(capsys, *RUN, "--out", str(out), *overrides)
    assert code == 2 and stdout == ""
    assert expected in one_error_line(err)
    assert not out.exists()


BAD_PRESETS = {
    "unknown-key": ("extends: hylorada/smoke\ntrain:\n  lrr: 0.1\n",
                    "unknown key 'train.lrr' in HyloradaStudyConfig ({path}); did you mean 'train.lr'?"),
    "unknown-top-level-key": ("extends: hylorada/smoke\nnum_trian: 10\n",
                              "unknown key 'num_trian' in HyloradaStudyConfig ({path}); did you mean 'num_train'?"),
    "out-of-range": ("extends: hylorada/smoke\nadapter:\n  r: -3\n",
                     "adapter.r = -3: Input should be greater than or equal to 1 ({path})"),
    "wrong-type": ("extends: hylorada/smoke\ntrain: {epochs: many}\n",
                   "train.epochs = 'many': Input should be a valid number"),
    "bad-yaml": ("extends: hylorada/smoke\ntrain:\n  lr: [1, 2\n  epochs: 1\n",
                 "{path}: invalid YAML at line 4, column 9: expected ',' or ']', but got ':'"),
    "bad-indentation": ("extends: hylorada/smoke\ntrain:\n  lr: 0.1\n epochs: 1\n", "{path}: invalid YAML at line 4"),
    "tab-indentation": ("extends: hylorada/smoke\ntrain:\n\tlr: 0.1\n", "{path}: invalid YAML at line 3"),
    "not-a-mapping": ("- lr: 0.1\n", "{path}: expected a mapping of keys to values at the top level, got list"),
    "self-referencing-alias": ("extends: hylorada/smoke\nonly: &a [*a]\n", "{path}: invalid YAML: nested too deeply"),
    "deeply-nested": ("extends: hylorada/smoke\nonly: " + "[" * 5000 + "\n", "{path}: invalid YAML"),
    "unknown-parent": ("extends: hylorada/nonexistent\n", "configs/hylorada/nonexistent.yaml does not exist"),
    "extends-not-a-name": ("extends: [1]\n", "{path}: 'extends' must name a preset such as hylorada/default"),
}


@pytest.mark.parametrize("case", list(BAD_PRESETS))
def test_bad_preset_file_exits_2_naming_file_key_or_line(capsys, tmp_path, case):
    text, expected = BAD_PRESETS[case]
    preset = tmp_path / "my.yaml"
    preset.write_text(text, encoding="utf-8")
    out = tmp_path / "run"
    code, _, err = cli(capsys, "run", "hylorada", "--preset", str(preset), "--quiet", "--out", str(out))
    assert code == 2
    assert expected.format(path=preset) in one_error_line(err)
    assert not out.exists()


def test_non_utf8_preset_and_missing_preset_exit_2(capsys, tmp_path):
    preset = tmp_path / "latin.yaml"
    preset.write_bytes("extends: hylorada/smoke\nmodel: caf\xe9\n".encode("latin-1"))
    code, _, err = cli(capsys, "run", "hylorada", "--preset", str(preset))
    assert code == 2 and f"config file {preset} is not UTF-8 text" in one_error_line(err)
    code, _, err = cli(capsys, "run", "hylorada", "--preset", str(tmp_path / "nowhere.yaml"))
    assert code == 2 and f"config file {tmp_path / 'nowhere.yaml'} does not exist" in one_error_line(err)
    code, _, err = cli(capsys, "run", "hylorada", "--preset", "smokey")
    assert code == 2
    assert "preset 'smokey' does not exist for study 'hylorada'; choose one of default, paper, smoke" in err


BAD_USAGE = {
    "unknown-study": (("run", "hyloradda"), "argument study: invalid choice: 'hyloradda'"),
    "zero-seeds": ((*RUN, "--seeds", "0"), "--seeds must be >= 1, got 0"),
    "negative-seeds": ((*RUN, "--seeds", "-2"), "--seeds must be >= 1, got -2"),
    "seeds-not-a-number": ((*RUN, "--seeds", "two"), "argument --seeds: invalid int value: 'two'"),
    "zero-threads": ((*RUN, "--threads", "0"), "--threads must be >= 1, got 0"),
    "unknown-option": ((*RUN, "--sedes", "2"), "unrecognized arguments: --sedes 2"),
    "resume-a-non-run": (("run", "hylorada", "--resume", "{tmp}"), "{tmp} has no study.yaml: it is not an lmlab run"),
    "zero-stride": (("eval", "ppl", "--model", "m", "--data", "d.txt", "--max-length", "8", "--stride", "0"),
                    "--stride must be between 1 and --max-length (8), got 0"),
    "stride-above-window": (("eval", "ppl", "--model", "m", "--data", "d.txt", "--max-length", "8", "--stride", "9"),
                            "--stride must be between 1 and --max-length (8), got 9"),
    "zero-window": (("eval", "ppl", "--model", "m", "--data", "d.txt", "--max-length", "0"),
                    "--max-length must be >= 1, got 0"),
    "zero-batch": (("eval", "ppl", "--model", "m", "--data", "d.txt", "--max-length", "8", "--batch-size", "0"),
                   "--batch-size must be >= 1, got 0"),
    "no-data": (("eval", "ppl", "--model", "m", "--max-length", "8"), "the following arguments are required: --data"),
    "no-command": ((), "the following arguments are required: command"),
}


@pytest.mark.parametrize("case", list(BAD_USAGE))
def test_bad_usage_exits_2_with_one_line(capsys, tmp_path, case):
    args, expected = BAD_USAGE[case]
    code, stdout, err = cli(capsys, *(a.format(tmp=tmp_path) for a in args))
    assert code == 2 and stdout == ""
    assert expected.format(tmp=tmp_path) in one_error_line(err)


def test_a_key_holding_a_line_break_still_gives_one_line(capsys, tmp_path):
    preset = tmp_path / "my.yaml"
    preset.write_text('extends: hylorada/smoke\n"num_\\ntrain": 3\n', encoding="utf-8")
    code, _, err = cli(capsys, "run", "hylorada", "--preset", str(preset))
    assert code == 2 and "unknown key 'num_ train'" in one_error_line(err)


def test_a_real_process_exits_2_with_exactly_one_stderr_line(tmp_path):
    """The same contract in a separate process (the interpreter's own exit path, no pytest in between)."""
    preset = tmp_path / "my.yaml"
    preset.write_text("extends: hylorada/smoke\nadapter:\n  r: 0\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "lmlab.cli", "run", "hylorada", "--preset", str(preset),
                           "train.lr=1e-3"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"lmlab: error: adapter.r = 0: Input should be greater than or equal to 1 ({preset})\n"
    assert not (Path(tmp_path) / "runs").exists()
