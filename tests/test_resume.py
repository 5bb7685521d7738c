"""A study killed mid-cell (SIGKILL mid-step, mid-checkpoint write, mid-evaluation; SIGTERM) and resumed with
`--resume` ends with the same results, metrics.jsonl and final weights as a run never stopped: bitwise on CPU with
one thread, for a HyLoRADA, a LatentWire and an MU cell, and with two processes (torchrun, gloo)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import LMLAB, ONE_THREAD, read_jsonl, run_cli

KILLER = Path(__file__).with_name("kill_worker.py")
TIMING = ("time", "per_s", "peak_mem", "latency")
# one seed, few cells, several checkpoints and evaluations per cell
SETTINGS = {
    "hylorada": ["only=[rslora]", "train.epochs=4", "train.checkpoint_every=2"],
    "latentwire": ["only=[stable_k4]", "train.checkpoint_every=2"],
    "mu": ["only=[dense]", "train.checkpoint_every=2", "train.eval_every=3"],
}


def study_args(study: str, out: Path, *extra: str) -> list[str]:
    return ["run", study, "--preset", "smoke", "--seeds", "1", "--quiet", "--out", str(out), *SETTINGS[study], *extra]


def killed(args: list[str], point: str, *, nproc: int = 1) -> subprocess.CompletedProcess:
    env = {**ONE_THREAD, "LMLAB_TEST_KILL": point}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    return subprocess.run([*launcher, str(KILLER), *args], capture_output=True, text=True, timeout=900, env=env)


def resume_args(study: str, out: Path, nproc: int = 1) -> list[str]:
    return ["run", study, "--resume", str(out), "--quiet", *(["--nproc", str(nproc)] if nproc > 1 else [])]


def comparable(row: dict) -> dict:
    return {"status": row["status"],
            "metrics": {k: v for k, v in row["metrics"].items() if not any(t in k for t in TIMING)}}


def without_speed(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_jsonl(path)]


def close(a, b, rel: float) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y, rel) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return a == b or math.isclose(a, b, rel_tol=rel)
    return a == b


def assert_same_run(reference: Path, resumed: Path, rel: float = 0.0) -> None:
    rows = {(r["config"], r["seed"]): comparable(r) for r in read_jsonl(reference / "results.jsonl")}
    again = {(r["config"], r["seed"]): comparable(r) for r in read_jsonl(resumed / "results.jsonl")}
    assert rows.keys() == again.keys()
    for cell in rows:
        assert rows[cell]["status"] == "ok"
        assert close(rows[cell], again[cell], rel), (cell, rows[cell], again[cell])
    cells = sorted(p.relative_to(reference) for p in (reference / "cells").glob("*/seed-*"))
    assert cells == sorted(p.relative_to(resumed) for p in (resumed / "cells").glob("*/seed-*"))
    for cell in cells:
        assert close(without_speed(reference / cell / "metrics.jsonl"), without_speed(resumed / cell / "metrics.jsonl"),
                     rel), cell
        assert not (resumed / cell / "train_state").exists()  # a recorded cell keeps no training checkpoint
        for f in sorted((reference / cell).rglob("*.safetensors")):
            a, b = load_file(f), load_file(resumed / f.relative_to(reference))
            assert a.keys() == b.keys()
            for k in a:
                assert torch.equal(a[k], b[k]) if rel == 0 else torch.allclose(a[k], b[k], rtol=rel, atol=1e-7), (f, k)
        for f in sorted((reference / cell).rglob("*samples*.jsonl")):
            assert close(read_jsonl(f), read_jsonl(resumed / f.relative_to(reference)), rel), f


def finish(args: list[str]) -> None:
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr[-3000:]


# Each chain kills one run several times at different points, resuming in between, then lets it finish.
CHAINS = {
    "hylorada": ["step:5", "checkpoint:2", "step:9"],
    "latentwire": ["eval:2", "checkpoint:1", "step:3"],
    "mu": ["checkpoint:2", "eval:2", "step:4"],
}


@pytest.mark.parametrize("study", sorted(CHAINS))
def test_a_study_killed_mid_step_mid_checkpoint_and_mid_evaluation_resumes_to_the_same_run(tmp_path, study):
    reference = tmp_path / "reference"
    finish(study_args(study, reference))
    out = tmp_path / "killed"
    for i, point in enumerate(CHAINS[study]):
        args = study_args(study, out) if i == 0 else resume_args(study, out)
        done = killed(args, point)
        assert done.returncode == -signal.SIGKILL, (point, done.returncode, done.stderr[-3000:])
    assert list((out / "cells").rglob("train_state/step-*")), "the kills left no checkpoint to resume from"
    finish(resume_args(study, out))
    assert_same_run(reference, out)


def test_a_two_stage_cell_killed_in_each_stage_resumes_to_the_same_run(tmp_path):
    """`rslora-frozen+bias` trains rsLoRA (12 steps here), then the bias alone on it (12 more): killed in the first
    stage, then in the second, it resumes each stage from its own checkpoint to the results of a run never stopped,
    and its recorded cell keeps neither stage's checkpoints."""
    args = ["only=[rslora-frozen+bias]", "train.epochs=4", "train.checkpoint_every=2"]
    reference = tmp_path / "reference"
    finish(["run", "hylorada", "--preset", "smoke", "--seeds", "1", "--quiet", "--out", str(reference), *args])
    out = tmp_path / "killed"
    cell = out / "cells" / "rslora-frozen+bias" / "seed-42"
    # before step 5 of the first stage (after the 12 steps of the reference cell `lora`); then, resumed from its
    # step 4, before step 5 of the second stage (8 + 5 steps later)
    for i, point in enumerate(["step:17", "step:13"]):
        run = (["run", "hylorada", "--preset", "smoke", "--seeds", "1", "--quiet", "--out", str(out), *args] if i == 0
               else resume_args("hylorada", out))
        done = killed(run, point)
        assert done.returncode == -signal.SIGKILL, (point, done.returncode, done.stderr[-3000:])
        stage = cell / "train_state" / ("lora-stage" if i == 0 else "")
        assert sorted(p.name for p in stage.glob("step-*")) == ["step-00000004"], point  # where it resumes
    # the finished first stage's final checkpoint is kept: resumed, that stage restores it and trains no step again,
    # so the run finishes within the second stage's 8 remaining steps (a 9th step would kill it)
    assert sorted(p.name for p in (cell / "train_state" / "lora-stage").glob("step-*")) == ["step-00000012"]
    done = killed(resume_args("hylorada", out), "step:9")
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])
    assert_same_run(reference, out)
    for run in (reference, out):
        first = read_jsonl(run / "cells" / "rslora-frozen+bias" / "seed-42" / "metrics-lora-stage.jsonl")
        assert [r["step"] for r in first if r["kind"] == "train"] == list(range(1, 13))
    assert without_speed(reference / cell.relative_to(out) / "metrics-lora-stage.jsonl") == without_speed(
        cell / "metrics-lora-stage.jsonl")


def test_sigterm_checkpoints_the_running_cell_and_resume_continues_it(tmp_path):
    args = ["train.epochs=24", "train.checkpoint_every=1000", "train.eval_every=20"]
    reference = tmp_path / "reference"
    finish(study_args("mu", reference, *args))
    out = tmp_path / "stopped"
    process = subprocess.Popen([*LMLAB, *study_args("mu", out, *args)], env=ONE_THREAD, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = out / "cells" / "dense" / "seed-42" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert f"lmlab run mu --resume {out}" in stderr
    assert list((out / "cells" / "dense" / "seed-42" / "train_state").glob("step-*"))  # written on the signal
    finish(resume_args("mu", out))
    assert_same_run(reference, out)


@pytest.mark.xdist_group("ddp")
def test_two_processes_killed_mid_step_resume_to_the_same_run(tmp_path):
    reference = tmp_path / "reference"
    finish(study_args("mu", reference, "--nproc", "2"))
    out = tmp_path / "killed"
    done = killed(study_args("mu", out), "step:5", nproc=2)
    assert done.returncode != 0, done.stderr[-3000:]
    assert list((out / "cells").rglob("train_state/step-*")), done.stderr[-3000:]
    done = killed(resume_args("mu", out), "checkpoint:2", nproc=2)
    assert done.returncode != 0
    finish(resume_args("mu", out, nproc=2))
    assert_same_run(reference, out, rel=1e-6)


def test_resume_in_a_fresh_environment_needs_no_state_but_the_run_directory(tmp_path):
    """The checkpoint is everything: a resumed process shares no memory with the killed one (a new interpreter),
    and the run directory is all it reads."""
    out = tmp_path / "killed"
    done = killed(study_args("mu", out), "step:3")
    assert done.returncode == -signal.SIGKILL
    state = next((out / "cells").rglob("train_state"))
    names = sorted(p.name for p in next(state.glob("step-*")).iterdir())
    assert names == ["state.json", "tensors.safetensors"]  # no pickle anywhere
    assert os.path.getsize(state.parent / "metrics.jsonl") > 0
