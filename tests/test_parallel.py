"""--parallel and --executor: placement of workers, one-line errors, and the sbatch script submitit writes for a
cell (the end-to-end runs are in test_studies.py, beside the sequential run they are compared with)."""

from __future__ import annotations

import os
import signal
import stat
import time
from pathlib import Path

import pytest

from helpers import require_extras, run_cli
from lmlab.config import build
from lmlab.engine.hooks import Display
from lmlab.errors import ConfigError
from lmlab.studies.parallel import CellJob, ExecutorOptions, Slot, _worker, make_executor, plan_slots, resolve_parallel
from lmlab.studies.rundir import RunDir


def test_resolve_parallel_reads_numbers_and_auto():
    assert resolve_parallel(None) == 1 and resolve_parallel("3") == 3 and resolve_parallel(2) == 2
    assert resolve_parallel("auto") >= 1
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(ConfigError, match="--parallel must be"):
            resolve_parallel(bad)


def test_auto_on_cpu_gives_one_worker_per_pinned_threads_share_of_the_cores(monkeypatch):
    monkeypatch.setenv("LMLAB_DEVICE", "cpu")
    cores = len(os.sched_getaffinity(0))
    assert resolve_parallel("auto") == 1  # a cell that may use every core: one at a time
    assert resolve_parallel("auto", threads=1) == cores  # one-thread cells: one per core
    assert resolve_parallel("auto", threads=2) == max(1, cores // 2)
    assert resolve_parallel("auto", threads=cores + 1) == 1
    assert resolve_parallel(1, threads=1) == 1  # a number is taken as given


def test_a_configs_parallel_applies_without_the_flag_and_yields_to_nproc_and_executors(monkeypatch):
    from lmlab.engine import distributed as D
    from lmlab.studies.runner import StudyConfig, _workers

    monkeypatch.setenv("LMLAB_DEVICE", "cpu")
    cores = len(os.sched_getaffinity(0))
    cfg = build(StudyConfig, {"parallel": "auto", "threads": 1})
    assert _workers(None, cfg, None) == cores  # the preset's default
    assert _workers("1", cfg, None) == 1  # the command's --parallel wins
    assert _workers(None, cfg, ExecutorOptions(kind="local")) == 1  # an executor runs the cells: no conflict
    monkeypatch.setattr(D, "world_size", lambda: 2)
    assert _workers(None, cfg, None) == 1  # under DDP the preset's default yields
    if cores > 1:
        with pytest.raises(ConfigError, match="do not combine with --nproc"):
            _workers("2", cfg, None)  # an explicit --parallel does not
    assert build(StudyConfig, {"parallel": 2}).parallel == 2
    monkeypatch.setattr(D, "world_size", lambda: 1)
    too_many = cores + 1  # a refusal names what the user wrote: the config field or the flag
    with pytest.raises(ConfigError, match=rf"^parallel={too_many} needs {too_many} CPU cores.*use parallel={cores} "):
        _workers(None, build(StudyConfig, {"parallel": too_many}), None)
    with pytest.raises(ConfigError, match=rf"^--parallel {too_many} needs"):
        _workers(str(too_many), cfg, None)
    for bad in (0, "two"):
        with pytest.raises(ConfigError, match="parallel"):
            build(StudyConfig, {"parallel": bad})


def test_eta_of_parallel_workers_shares_the_cells_left_among_them():
    from lmlab.studies.runner import workers_eta_text

    # two cells of 80 s and 100 s done, six left, two workers: 90 s x 6 / 2 = 270 s
    assert workers_eta_text([80.0, 100.0], 6, 2) == ", eta 4m30s"
    assert workers_eta_text([80.0], 15, 2) == ", eta 10m00s"  # the first cell of sixteen, not 20 minutes
    assert workers_eta_text([80.0], 0, 2) == "" and workers_eta_text([], 3, 2) == ""


def test_cpu_workers_get_disjoint_shares_of_the_cores(monkeypatch):
    monkeypatch.setenv("LMLAB_DEVICE", "cpu")  # CPU placement also on a machine with GPUs
    cores = sorted(os.sched_getaffinity(0))
    slots = plan_slots(len(cores))
    assert [s.cores for s in slots] == [(c,) for c in cores] and all(s.threads == 1 for s in slots)
    assert all(s.gpu is None for s in slots)
    one = plan_slots(1)
    assert one[0].cores == tuple(cores) and one[0].threads == len(cores)
    assert plan_slots(1, threads=1)[0].threads == 1  # the study's `threads` caps a worker's threads
    with pytest.raises(ConfigError, match=f"needs {len(cores) + 1} CPU cores"):
        plan_slots(len(cores) + 1)


def test_gpu_workers_get_a_gpu_each_unless_the_run_is_kept_on_the_cpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # placement only: nothing touches a device
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LMLAB_DEVICE", raising=False)
    assert [s.gpu for s in plan_slots(2)] == [0, 1] and resolve_parallel("auto") == 2
    with pytest.raises(ConfigError, match="--parallel 3 needs 3 GPUs, 2 visible"):
        plan_slots(3)
    monkeypatch.setenv("LMLAB_DEVICE", "cpu")
    assert all(s.gpu is None for s in plan_slots(1)) and resolve_parallel("auto") == 1


def test_placement_errors_are_one_line_and_leave_no_directory(tmp_path: Path):
    cases = [
        (["--parallel", "0"], "--parallel must be a positive integer"),
        (["--parallel", "2", "--executor", "local"], "choose one"),
        (["--slurm-partition", "gpu"], "add --executor slurm"),
        (["--executor", "local", "--slurm-option", "account"], "KEY=VALUE"),
    ]
    if not __import__("torch").cuda.is_available():
        cases.append((["--parallel", str(len(os.sched_getaffinity(0)) + 1)], "CPU cores"))
    if not any((Path(p) / "srun").exists() for p in os.environ.get("PATH", "").split(os.pathsep)):
        cases.append((["--executor", "slurm"], "--executor local"))
    for i, (args, message) in enumerate(cases):
        out = tmp_path / f"run{i}"
        proc = run_cli("run", "hylorada", "--preset", "smoke", "--out", str(out), "--quiet", *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, (args, proc.stderr)
        assert not (out / "results.jsonl").exists()


def _fake_slurm(bin_dir: Path, record: Path) -> None:
    """`srun` and `sbatch` as a scheduler would answer (the scheduler is what is absent here, not submitit)."""
    bin_dir.mkdir()
    scripts = {
        "srun": "#!/bin/sh\nexit 0\n",
        "sbatch": f'#!/bin/sh\nfor a in "$@"; do last="$a"; done\ncp "$last" "{record}"\n'
                  'echo "Submitted batch job 4242"\n',
    }
    for name, text in scripts.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_slurm_job_script_carries_the_options(tmp_path: Path, monkeypatch):
    require_extras("submitit")
    submitted = tmp_path / "submitted.sh"
    _fake_slurm(tmp_path / "bin", submitted)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    options = ExecutorOptions(kind="slurm", partition="gpu", gpus_per_cell=2, cpus_per_cell=4, time_min=30,
                              mem_gb=64, extra={"account": "proj"})
    executor = make_executor(run, options, "lmlab-hylorada")
    job = executor.submit(CellJob(str(run.root), "lora", 42, threads=4))
    assert job.job_id == "4242"
    script = submitted.read_text()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2", "#SBATCH --cpus-per-task=4",
                 "#SBATCH --time=30", "#SBATCH --account=proj", "#SBATCH --job-name=lmlab-hylorada",
                 "#SBATCH --mem=64GB"):
        assert line in script, (line, script)
    assert "submitit.core._submit" in script  # the job runs the pickled CellJob through submitit


def test_executor_options_are_checked():
    with pytest.raises(ConfigError, match="--executor must be"):
        ExecutorOptions(kind="pbs")
    with pytest.raises(ConfigError, match="--slurm-time"):
        ExecutorOptions(kind="local", time_min=0)
    with pytest.raises(ConfigError, match="--slurm-cpus-per-cell"):
        ExecutorOptions(kind="slurm", cpus_per_cell=0)


def _catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler installed for `signum` (Linux: the SigCgt mask in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads signal masks from /proc")
def test_a_worker_stopped_while_it_waits_for_a_cell_ends_cleanly(tmp_path: Path):
    """SIGTERM reaching a --parallel worker between cells (waiting on its task queue) once raised a
    KeyboardInterrupt out of the wait: a traceback on stderr and a dead worker. It must mark the worker stopping,
    report the cell it is handed next as stopped without computing it, and exit 0."""
    import multiprocessing as mp

    context = mp.get_context("spawn")
    tasks, events = context.Queue(), context.Queue()
    slot = Slot(0, None, tuple(sorted(os.sched_getaffinity(0)))[:1], 1)
    worker = context.Process(target=_worker, args=(slot, str(tmp_path / "no-run"), Display(progress=False),
                                                   tasks, events))
    worker.start()
    try:
        deadline = time.monotonic() + 120
        while not _catches(worker.pid, signal.SIGTERM):  # its handler is installed: it now waits on `tasks`
            assert worker.is_alive() and time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.05)
        time.sleep(0.2)
        os.kill(worker.pid, signal.SIGTERM)
        time.sleep(0.2)
        assert worker.is_alive()  # the signal did not end it while it waited
        tasks.put(("lora", 1))  # no run directory exists: computing this cell would fail
        assert events.get(timeout=60) == ("stopped", 0, "lora", 1, None)
        worker.join(timeout=60)
        assert worker.exitcode == 0
    finally:
        if worker.is_alive():
            worker.kill()
