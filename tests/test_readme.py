"""README.md's code runs as written.

- Every ```python block runs on its own in a fresh process, in an empty temporary directory, offline.
- In ```bash blocks, every `lmlab` command (also `torchrun ... -m lmlab.cli ...`) runs in order in one empty
  temporary directory per block, unless its comment marks it as expensive with a parenthesis that says minutes or
  hours, e.g. `# (minutes)`: those are listed as skipped, never dropped silently. A line with placeholders (an
  upper-case word such as STUDY or DIR, `[...]` or `...`) is a synopsis: its subcommand's `--help` must exist and
  name every option the line shows. Other programs (make, ruff) are not lmlab commands and are not run here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import require_extras
from lmlab.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
EXPENSIVE = re.compile(r"\((?:[^()]*\W)?(?:minutes|hours)(?:\W[^()]*)?\)")
PLACEHOLDER = re.compile(r"^(?:[A-Z][A-Z_]+|\[.*|\.\.\.\]?)$")  # STUDY, DIR_OR_JSONL, [--seeds, ..., ...]
OFFLINE = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def blocks(language: str) -> list[tuple[int, str]]:
    """(line number, body) of every block fenced as `language`."""
    text = README.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == language]


def lmlab_args(line: str) -> list[str] | None:
    """The arguments after `lmlab` when `line` runs lmlab (directly or under torchrun), else None."""
    words = shlex.split(line, comments=True)
    if words and words[0] in ("lmlab", ".venv/bin/lmlab"):
        return words[1:]
    if "lmlab.cli" in words:
        return words[words.index("lmlab.cli") + 1:]
    return None


def commands(body: str) -> list[tuple[int, str, list[str], str | None]]:
    """(line offset in the block, line, lmlab arguments, why it is skipped or None) for every lmlab command of a
    bash block."""
    out = []
    for offset, line in enumerate(body.splitlines(), start=1):
        args = lmlab_args(line)
        if args is None:
            continue
        marker = EXPENSIVE.search(line.partition("#")[2])
        out.append((offset, line, args, marker.group(0) if marker else None))
    return out


PYTHON = blocks("python")
BASH = [(number, body) for number, body in blocks("bash") if commands(body)]
MARKED = [(number + offset, line, marker) for number, body in BASH for offset, line, _, marker in commands(body)
          if marker]


def test_the_readme_has_the_blocks_this_test_runs():
    assert PYTHON, "no ```python block found"
    runnable = [c for _, body in BASH for c in commands(body) if c[3] is None]
    assert len(runnable) >= 5, runnable  # the synopses and the smoke commands at least


@pytest.mark.parametrize(("number", "body"), PYTHON, ids=[f"python-line-{n}" for n, _ in PYTHON])
def test_python_block_runs_as_written(number, body, tmp_path):
    require_the_extras_of(body)
    script = tmp_path / "block.py"
    script.write_text(body, encoding="utf-8")
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run([sys.executable, str(script)], cwd=work, capture_output=True, text=True, timeout=600,
                          env=OFFLINE)
    assert proc.returncode == 0, f"README.md line {number}:\n{proc.stderr[-3000:]}"


def require_the_extras_of(text: str) -> None:
    """A block that uses an optional extra (lm-eval, a tracker, submitit's executors) needs it installed
    (`helpers.require_extras`)."""
    needs = {"lm_eval": ("lm_eval", "lm-eval"), "tensorboard": ("tensorboard",), "wandb": ("wandb",),
             "mlflow": ("mlflow",), "submitit": ("--executor",)}
    require_extras(*(module for module, words in needs.items() if any(w in text for w in words)))


def check_synopsis(args: list[str], capsys) -> None:
    """`lmlab SUBCOMMAND --help` exists and names every option of the synopsis line."""
    words = []
    for word in args:
        if word.startswith("-") or PLACEHOLDER.match(word):
            break
        words.append(word)
    with pytest.raises(SystemExit) as exit_info:
        main([*words, "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    options = {m for word in args for m in re.findall(r"--[\w-]+", word)}
    missing = sorted(o for o in options if o not in help_text)
    assert not missing, f"`lmlab {' '.join(words)} --help` does not know {missing}"


@pytest.mark.parametrize(("number", "body"), BASH, ids=[f"bash-line-{n}" for n, _ in BASH])
def test_bash_block_lmlab_commands_run_as_written(number, body, tmp_path, capsys):
    runnable = [(line, args) for _, line, args, marker in commands(body) if marker is None]
    if not runnable:
        pytest.skip(f"README.md line {number}: every lmlab command is marked expensive")
    require_the_extras_of("\n".join(line for line, args in runnable  # synopses only read --help
                                     if not any(PLACEHOLDER.match(word) for word in args)))
    for line, args in runnable:
        if any(PLACEHOLDER.match(word) for word in args):
            check_synopsis(args, capsys)
            continue
        # cells in parallel / as jobs split the CPU where a machine has fewer GPUs than workers: pinned to the CPU,
        # as the README says (LMLAB_DEVICE=cpu); every other command runs where it would for a user
        env = {**OFFLINE, "LMLAB_DEVICE": "cpu"} if {"--parallel", "--executor"} & set(args) else OFFLINE
        proc = subprocess.run([sys.executable, "-m", "lmlab.cli", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=600, env=env)
        assert proc.returncode == 0, f"README.md block at line {number}: {line}\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize(("number", "line", "marker"), MARKED,
                         ids=[line.split("#")[0].strip() for _, line, _ in MARKED])
def test_commands_marked_expensive_are_skipped_by_name(number, line, marker):
    pytest.skip(f"README.md line {number} is marked {marker}: not run by the test suite")
