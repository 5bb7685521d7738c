"""Long runs that go wrong: a signal mid-cell, a non-finite loss, a used or unwritable output directory,
damaged run files. Finished cells are never lost, a partial cell is never kept, nothing is overwritten."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from helpers import LMLAB, ONE_THREAD, comparable_summary, run_cli
from lmlab.errors import ConfigError
from lmlab.studies.rundir import RunDir
from test_reliability_checkpoints import cli, one_error_line

# One worker runs this file and its study fixtures live for the session: each study runs once, not once per
# xdist worker or per interleaved module.
pytestmark = pytest.mark.xdist_group("reliability-runs")

# One torch thread per study process: the suite runs two test workers on two cores.

# The MU smoke study on its reference configuration only: two cells of a few seconds each.
MU_RUN = ["run", "mu", "--preset", "smoke", "--seeds", "2", "--quiet", "only=[dense]"]
MU_CELLS = [("dense", 42), ("dense", 123)]


def result_rows(run: Path) -> list[dict]:
    path = run / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def cell_dirs(run: Path) -> set[tuple[str, int]]:
    return {(p.parent.name, int(p.name.split("-")[1])) for p in (run / "cells").glob("*/seed-*")}


@pytest.fixture(scope="session")
def uninterrupted_mu(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mu-uninterrupted") / "run"
    proc = run_cli(*MU_RUN, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert [(r["config"], r["seed"]) for r in result_rows(out)] == MU_CELLS
    return out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_cell_keeps_finished_cells_and_resume_matches_an_uninterrupted_run(uninterrupted_mu, tmp_path,
                                                                                      signum):
    out = tmp_path / "run"
    proc = subprocess.Popen([*LMLAB, *MU_RUN, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ONE_THREAD)
    partial = out / "cells" / "dense" / "seed-123"
    deadline = time.time() + 300
    # After the first finished cell, wait until the second is training (its curve has a line), then signal. The
    # file alone is not enough: it is created just before the loop starts watching for signals, and a signal in
    # that gap rightly discards the cell (nothing to continue from).
    curve = partial / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if len(result_rows(out)) == 1 and curve.exists() and curve.read_text().strip():
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr
    assert "--resume" in stderr and "Traceback" not in stderr

    finished = result_rows(out)
    assert [(r["config"], r["seed"]) for r in finished] == MU_CELLS[:1] and finished[0]["status"] == "ok"
    # the partial cell stopped at a step boundary and checkpointed its training state for --resume
    assert cell_dirs(out) == set(MU_CELLS) and list((partial / "train_state").glob("step-*"))
    stamp = (out / "cells" / "dense" / "seed-42" / "config.json").stat().st_mtime_ns

    resumed = run_cli("run", "mu", "--resume", str(out), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {out}: 1 of 2 cells already finished" in resumed.stderr
    assert "dense seed 123: resuming from the checkpoint of step" in resumed.stderr
    assert not (partial / "train_state").exists()  # a recorded cell keeps no training checkpoint
    rows = result_rows(out)
    assert [(r["config"], r["seed"]) for r in rows] == MU_CELLS  # each cell exactly once
    assert rows[0] == finished[0]
    assert (out / "cells" / "dense" / "seed-42" / "config.json").stat().st_mtime_ns == stamp  # not recomputed
    resumed_summary = json.loads((out / "summary.json").read_text())
    reference = json.loads((uninterrupted_mu / "summary.json").read_text())
    assert comparable_summary(resumed_summary) == comparable_summary(reference)


@pytest.fixture(scope="session")
def overflowing_run(tmp_path_factory) -> Path:
    """LoRA with alpha=1e38: B starts at zero, so step 1 is finite; after it the update overflows."""
    out = tmp_path_factory.mktemp("nonfinite") / "run"
    proc = run_cli("run", "hylorada", "--preset", "smoke", "--seeds", "2", "--out", str(out), "--quiet",
                   "only=[base]", "adapter.alpha=1e38")
    assert proc.returncode == 0, proc.stderr
    assert "lora seed 42: FAILED - non-finite " in proc.stderr
    return out


def test_non_finite_loss_fails_the_cell_with_step_and_loss_and_the_study_goes_on(overflowing_run):
    rows = {(r["config"], r["seed"]): r for r in result_rows(overflowing_run)}
    assert list(rows) == [("base", 42), ("lora", 42), ("base", 123), ("lora", 123)]  # went on after the failure
    failed = rows["lora", 42]
    assert failed["status"] == "failed" and failed["metrics"] == {}
    # The smoke cell has 3 optimizer steps (24 examples, batch 8); B starts at zero, so the overflow comes after
    # the first update (the engine may catch it in the gradient norm or one step later in the loss).
    match = re.fullmatch(r"non-finite (loss|gradient norm) (nan|inf|-inf) at optimizer step ([123])", failed["error"])
    assert match, failed["error"]
    assert failed["details"] == {"failed_step": int(match[3]), "failed_loss": match[2]}
    assert rows["base", 123]["status"] == "ok" and isinstance(rows["base", 123]["metrics"]["val_ppl"], float)


def test_overflowing_gradients_never_pass_as_an_ok_cell(overflowing_run):
    """Seed 123 overflows only the gradient norm (the loss stays finite). Clipping would turn it into zero
    gradients, the adapter would stay at its init and the cell would pass as ok with the base's val_ppl;
    the engine fails the cell at the first such step instead."""
    row = {(r["config"], r["seed"]): r for r in result_rows(overflowing_run)}["lora", 123]
    assert row["status"] == "failed" and row["error"] == "non-finite gradient norm inf at optimizer step 1"


def test_report_lists_the_failed_cells_with_their_errors(capsys, overflowing_run):
    failed_rows = [r for r in result_rows(overflowing_run) if r["status"] == "failed"]
    assert ("lora", 42) in {(r["config"], r["seed"]) for r in failed_rows}
    summary = json.loads((overflowing_run / "summary.json").read_text())
    assert summary["failed_cells"] == [{"config": r["config"], "seed": r["seed"], "error": r["error"]}
                                       for r in failed_rows]
    assert summary["configs"]["lora"]["n_failed"] == len(failed_rows) and summary["configs"]["base"]["n_ok"] == 2
    (overflowing_run / "report.md").unlink()
    code, _, err = cli(capsys, "report", str(overflowing_run))
    assert code == 0, err
    report = (overflowing_run / "report.md").read_text()
    section = report.split("## Failed cells", 1)[1].split("\n## ", 1)[0]
    for r in failed_rows:
        assert f"| {r['config']} | {r['seed']} | {r['error']} |" in section, section


def test_existing_output_directory_or_file_is_refused_and_left_untouched(capsys, tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("four hours of results")
    code, _, err = cli(capsys, "run", "hylorada", "--preset", "smoke", "--out", str(used))
    assert code == 2
    assert f"output directory {used} already exists and is not empty; continue it with --resume {used}" in \
        one_error_line(err)
    assert [p.name for p in used.iterdir()] == ["notes.txt"] and (used / "notes.txt").read_text() == \
        "four hours of results"

    a_file = tmp_path / "results.txt"
    a_file.write_text("keep me")
    code, _, err = cli(capsys, "run", "hylorada", "--preset", "smoke", "--out", str(a_file))
    assert code == 2 and f"output path {a_file} is a file, not a directory" in one_error_line(err)
    assert a_file.read_text() == "keep me"


def test_concurrent_runs_never_share_an_output_directory(tmp_path):
    """Runs started in the same second get the same default directory name; exactly one may claim it."""
    root = tmp_path / "runs" / "hylorada-20260101-120000"
    start = threading.Barrier(8)
    outcomes: list[str] = []

    def claim() -> None:
        start.wait()
        try:
            RunDir(root).create()
            outcomes.append("claimed")
        except ConfigError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("claimed") == 1
    assert all("already exists" in o or "claimed by another run" in o for o in outcomes if o != "claimed")


def unwritable_out(tmp_path: Path, kind: str) -> Path:
    if kind == "parent-is-a-file":
        (tmp_path / "a-file").write_text("x")
        return tmp_path / "a-file" / "run"
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories; the parent-is-a-file case covers this path")
    parent = tmp_path / "read-only"
    parent.mkdir(mode=0o555)
    return parent / "run"


@pytest.mark.parametrize("kind", ["parent-is-a-file", "read-only-parent"])
def test_unwritable_output_directory_fails_before_any_training(capsys, monkeypatch, tmp_path, kind):
    cache = tmp_path / "model-cache"  # where the tiny base would be pretrained (the first training)
    cache.mkdir()
    monkeypatch.setenv("LMLAB_CACHE", str(cache))
    out = unwritable_out(tmp_path, kind)
    started = time.perf_counter()
    code, _, err = cli(capsys, "run", "hylorada", "--preset", "smoke", "--out", str(out))
    assert code == 2
    assert f"cannot write to the output directory {out}" in one_error_line(err) and "choose another --out" in err
    assert list(cache.iterdir()) == [] and time.perf_counter() - started < 30


@pytest.mark.parametrize(("damage", "expected"), [
    (lambda run: _replace_line(run / "results.jsonl", 1, '{"config": "lora", "se'),
     "results.jsonl line 2 is not a result line"),
    (lambda run: _replace_line(run / "results.jsonl", 0, '{"metrics": {}}'),
     "results.jsonl line 1 is not a result line (a JSON object with config, seed, status, metrics)"),
    (lambda run: (run / "study.yaml").write_text("study: hylorada\n"),
     "study.yaml is not an lmlab study file (no 'preset')"),
    (lambda run: (run / "study.yaml").write_text("study: [unclosed\n"), "study.yaml is not valid YAML"),
], ids=["truncated-line", "line-without-keys", "study-without-keys", "study-not-yaml"])
def test_damaged_run_files_are_named_by_report_and_resume(capsys, overflowing_run, tmp_path, damage, expected):
    run = tmp_path / "run"
    shutil.copytree(overflowing_run, run)
    damage(run)
    for args in (("report", str(run)), ("run", "hylorada", "--resume", str(run))):
        code, _, err = cli(capsys, *args)
        assert code == 2, err
        assert expected in one_error_line(err)


def _replace_line(path: Path, index: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[index] = text
    path.write_text("\n".join(lines) + "\n")
