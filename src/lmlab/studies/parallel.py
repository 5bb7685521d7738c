"""Cells side by side (docs/architecture.md section 3): `lmlab run STUDY --parallel N` runs N cells at once in worker
processes on this machine, each pinned to its own GPU or its own share of the CPU cores; `--executor slurm` (or
`local`, submitit's local executor: the same code path without a scheduler) submits one job per cell through
submitit.

Whatever computes a cell, it computes it the way a sequential run does (`cell.compute_row`, in the cell's
directory, with the same training checkpoints) and writes its row to `cells/<config>/seed-<s>/result.json`
atomically; one process - the coordinator - appends rows to `results.jsonl`, so the file has one writer. A row a
job wrote but no coordinator recorded (the submitting process was stopped) is collected by `lmlab report` and by
`--resume` (`collect_cell_results`). A cell is computed by one process at a time: its computing process holds
`.cells/<config>/seed-<s>.lock` (a flock, released however the process ends).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmlab.config import build
from lmlab.engine.hooks import Display
from lmlab.engine.interrupt import STOP, deliver_later, in_finalizer
from lmlab.errors import ConfigError, LmlabError
from lmlab.fileio import atomic_write_text
from lmlab.progress import quiet_libraries
from lmlab.studies.registry import get_study
from lmlab.studies.rundir import RunDir, json_safe

CELL_RESULT = "result.json"
EXECUTORS = ("slurm", "local")


# ------------------------------------------------------------------------------------------------ placement


@dataclass(frozen=True)
class Slot:
    """Where one worker runs: a GPU index (None on CPU), the CPU cores it is pinned to, its torch threads."""

    index: int
    gpu: int | None
    cores: tuple[int, ...]
    threads: int


def resolve_parallel(value: str | int | None, threads: int | None = None) -> int:
    """`--parallel N` (N >= 1) or `auto`: one cell per visible GPU; without a GPU, one cell per `threads` cores
    this process may use where the study pins its cells' `threads` (a tiny model's cell on one thread leaves the
    other cores idle), else 1 (a cell uses every core)."""
    if value is None:
        return 1
    text = str(value).strip()
    if text == "auto":
        import torch

        from lmlab.engine import distributed as D

        if D.uses_gpu():
            return max(1, torch.cuda.device_count())
        return max(1, len(_usable_cores()) // threads) if threads else 1
    if text.lstrip("+-").isdigit() and int(text) >= 1:
        return int(text)
    raise ConfigError(f"--parallel must be a positive integer or 'auto', got {value!r}")


def _usable_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def plan_slots(n: int, threads: int | None = None, asked: str = "--parallel {}") -> list[Slot]:
    """N workers: on a machine with GPUs, worker i on GPU i (N above the visible GPUs is refused); on CPU, the
    cores this process may use split into N contiguous shares (N above the cores is refused). `threads` (the
    study's `threads` field) caps each worker's torch threads; `asked` names where N came from in a refusal
    ("--parallel {}" for the flag, "parallel={}" for the config field)."""
    import torch

    cores = _usable_cores()
    from lmlab.engine import distributed as D

    gpus = torch.cuda.device_count() if D.uses_gpu() else 0  # LMLAB_DEVICE=cpu: CPU shares on a GPU machine
    if gpus and n > gpus:
        raise ConfigError(f"{asked.format(n)} needs {n} GPUs, {gpus} visible; use {asked.format(gpus)} (or auto)")
    if not gpus and n > len(cores):
        raise ConfigError(f"{asked.format(n)} needs {n} CPU cores, this process may use {len(cores)}; "
                          f"use {asked.format(len(cores))} or fewer (or auto)")
    slots = []
    for i in range(n):
        share = tuple(cores[i * len(cores) // n:(i + 1) * len(cores) // n])
        if gpus:  # a GPU worker keeps a share of the cores for its data and Python work
            share = share or tuple(cores)
        slots.append(Slot(i, i if gpus else None, share, min(threads or len(share), len(share))))
    return slots


def _pin(slot: Slot) -> None:
    """This process onto its slot: before CUDA is initialised, so the worker sees one GPU (its device 0)."""
    if slot.gpu is not None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else None
        os.environ["CUDA_VISIBLE_DEVICES"] = ids[slot.gpu] if ids and slot.gpu < len(ids) else str(slot.gpu)
    if hasattr(os, "sched_setaffinity"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, slot.cores)
    os.environ["OMP_NUM_THREADS"] = str(slot.threads)
    import torch

    torch.set_num_threads(slot.threads)


# ------------------------------------------------------------------------------------------------ one cell


_PREPARED: dict[str, tuple] = {}


def _prepared(run: RunDir, display: Display) -> tuple:
    """The study, its configuration and its prepared context, once per process. Processes prepare one at a time
    (a lock in the run directory): the first builds the shared caches (a tiny base, the learning-rate search),
    the others find them."""
    key = str(run.root.resolve())
    if key not in _PREPARED:
        from filelock import FileLock

        record = run.read_study()
        study = get_study(record["study"])
        cfg = build(study.config_cls, record["config"], where=str(run.study_path))
        with FileLock(str(run.root / ".prepare.lock")):
            ctx = study.prepare(cfg, run, display)
        _PREPARED[key] = (study, cfg, ctx)
    return _PREPARED[key]


def result_path(run: RunDir, config: str, seed: int) -> Path:
    return run.cell_dir(config, seed) / CELL_RESULT


def read_cell_result(run: RunDir, config: str, seed: int) -> dict | None:
    path = result_path(run, config, seed)
    try:
        row = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return row if isinstance(row, dict) and row.get("config") == config and row.get("seed") == seed else None


@contextlib.contextmanager
def cell_lock(run: RunDir, config: str, seed: int):
    """Yields True while this process holds the cell (False: another process is computing it)."""
    path = run.root / ".cells" / config / f"seed-{seed}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def compute_cell(run_root: str, config: str, seed: int, display: Display) -> dict | None:
    """Compute one cell of the run in `run_root` in this process, as a sequential run would, and write its row
    to the cell's `result.json`. Returns the row; the row already written by an earlier job; or None when another
    process is computing this cell. A signal stops training after a checkpoint (KeyboardInterrupt); the partial
    cell keeps its checkpoint for `--resume`."""
    from lmlab.studies.cell import compute_row

    run = RunDir(Path(run_root))
    done = read_cell_result(run, config, seed)
    if done is not None:
        return done
    with cell_lock(run, config, seed) as held:
        if not held:
            return None
        done = read_cell_result(run, config, seed)
        if done is not None:
            return done
        study, _, ctx = _prepared(run, display)
        try:
            row = compute_row(study, ctx, run, config, seed, display)
        except KeyboardInterrupt:
            run.discard_cell(config, seed, keep_checkpoint=True)
            raise
        atomic_write_text(result_path(run, config, seed), json.dumps(json_safe(row), allow_nan=False) + "\n")
        return row


def collect_cell_results(run: RunDir) -> int:
    """Record rows that jobs wrote (`result.json`) but no coordinator appended to `results.jsonl`; returns how
    many. Called by `lmlab report` and at the start of `--resume`."""
    record = run.read_study()
    recorded = {(r["config"], r["seed"]) for r in run.read_results()}
    added = 0
    for seed in record["seeds"]:
        for config in record["configurations"]:
            if (config, seed) in recorded:
                continue
            row = read_cell_result(run, config, seed)
            if row is not None:
                run.append_result(row)
                run.drop_checkpoints(config, seed)
                added += 1
    return added


# ------------------------------------------------------------------------------------------------ --parallel


def _stop_cell(signum, frame) -> None:
    """The signal handler of a process that computes one cell at a time (a worker, a submitit job): training takes
    the first signal as a request to checkpoint and stop; elsewhere the cell stops at once (KeyboardInterrupt; the
    partial cell is discarded) - but not inside a finalizer, where it would be printed and dropped."""
    if in_finalizer(frame):
        deliver_later(signum)
    elif not STOP.request(signum):
        raise KeyboardInterrupt(signum)


def _worker(slot: Slot, run_root: str, shown: Display, tasks, events) -> None:
    """A worker process: its own process group (signals reach it once, from the coordinator), pinned to its
    slot; computes the cells it is handed until it is handed None. A stop signal while it computes a cell goes
    to `_stop_cell`; one while it waits between cells only marks it stopping: a cell it is handed after that it
    reports as stopped (nothing computed) and ends - a KeyboardInterrupt raised out of the wait would print a
    traceback and kill the process."""
    os.setpgrp()
    _pin(slot)
    quiet_libraries()
    from lmlab import progress as bars
    from lmlab.studies.cell import log_line

    state = {"in_cell": False, "stop": None}

    def on_signal(signum, frame):
        if state["in_cell"]:
            _stop_cell(signum, frame)
        else:
            state["stop"] = signum

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    display = Display(shown.progress, "cell", log_line, position=slot.index, trackers=shown.trackers)
    with bars.enabled(shown.progress):
        while True:
            task = tasks.get()
            if task is None:
                return
            config, seed = task
            state["in_cell"] = True  # from here a signal stops the cell: before it starts, or as training does
            try:
                if state["stop"] is not None:
                    raise KeyboardInterrupt(state["stop"])
                events.put(("start", slot.index, config, seed, None))
                row = compute_cell(run_root, config, seed, display)
            except LmlabError as exc:
                state["in_cell"] = False
                events.put(("error", slot.index, config, seed, str(exc)))
                return
            except KeyboardInterrupt:
                state["in_cell"] = False
                events.put(("stopped", slot.index, config, seed, None))
                return
            state["in_cell"] = False
            events.put(("done", slot.index, config, seed, row))


def run_parallel(run: RunDir, todo: list[tuple[str, int]], slots: list[Slot], display: Display,
                 record: Callable[[dict], None], log: Callable[[str], None]) -> list[str]:
    """Compute `todo` on one worker process per slot; `record(row)` for each finished cell, in the order they
    finish. SIGINT/SIGTERM reach every worker once: each stops its training after a checkpoint; then
    `StudyInterrupted` is raised here. Bad input in a worker (an LmlabError) stops the others and is raised here.
    Returns lines about cells that did not finish (a worker process that died: `--resume` runs them again)."""
    import multiprocessing as mp

    from lmlab.studies.cell import StudyInterrupted

    context = mp.get_context("spawn")
    events = context.Queue()
    pending = deque(todo)
    workers: dict[int, tuple] = {}  # slot index -> (process, its task queue, slot)
    running: dict[int, tuple[str, int]] = {}
    unfinished: list[str] = []
    state: dict = {"stop": None, "error": None}

    def start(slot: Slot) -> None:
        tasks = context.Queue()
        shown = Display(display.progress, display.desc, trackers=display.trackers)  # what a worker needs of it
        process = context.Process(target=_worker, args=(slot, str(run.root), shown, tasks, events),
                                  name=f"lmlab-cell-worker-{slot.index}")
        process.start()
        workers[slot.index] = (process, tasks, slot)

    def hand_out(index: int) -> None:
        if pending and state["stop"] is None and state["error"] is None:
            running[index] = pending.popleft()
            workers[index][1].put(running[index])
        else:
            running.pop(index, None)
            workers[index][1].put(None)

    def stop_all(signum: int) -> None:
        for process, _, _ in workers.values():
            if process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signum)

    def on_signal(signum, frame):
        if state["stop"] is None:
            state["stop"] = signum
            log(f"stopping: each running cell checkpoints its training ({len(running)} running)")
            stop_all(signum)

    def handle(kind: str, index: int, config: str, seed: int, payload) -> None:
        if kind == "start":
            log(f"started {config} seed {seed} (worker {index + 1} of {len(slots)})")
        elif kind == "done":
            if payload is not None:
                record(payload)
            else:
                unfinished.append(f"{config} seed {seed} (another process is computing it; `lmlab report` "
                                  "collects its result)")
            hand_out(index)
        elif kind == "stopped":
            running.pop(index, None)
        elif kind == "error":
            running.pop(index, None)
            if state["error"] is None:
                state["error"] = payload
                stop_all(signal.SIGTERM)

    def reap(index: int) -> None:
        """A worker that died without a word: its cell did not finish; a fresh worker takes the next cells."""
        process, _, slot = workers[index]
        config, seed = running.pop(index)
        unfinished.append(f"{config} seed {seed} (its worker process ended with exit code {process.exitcode})")
        run.discard_cell(config, seed, keep_checkpoint=True)
        if pending and state["stop"] is None and state["error"] is None:
            start(slot)
            hand_out(index)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, on_signal)
    try:
        for slot in slots[:max(1, min(len(slots), len(pending)))]:
            start(slot)
            hand_out(slot.index)
        while running:
            try:
                handle(*events.get(timeout=0.5))
                continue
            except queue.Empty:
                pass
            for index in [i for i in running if not workers[i][0].is_alive()]:
                with contextlib.suppress(queue.Empty):  # its last words may still be in the pipe
                    while True:
                        handle(*events.get(timeout=1.0))
                if index in running and not workers[index][0].is_alive():
                    reap(index)
    finally:
        for _process, tasks, _ in workers.values():
            with contextlib.suppress(Exception):
                tasks.put(None)
        for process, _, _ in workers.values():
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if state["error"] is not None:
        raise LmlabError(state["error"])
    if state["stop"] is not None:
        raise StudyInterrupted(state["stop"])
    return unfinished


# ------------------------------------------------------------------------------------------------ --executor


@dataclass
class ExecutorOptions:
    """`--executor slurm|local` and its `--slurm-*` options."""

    kind: str = "slurm"
    partition: str | None = None
    gpus_per_cell: int | None = None
    cpus_per_cell: int | None = None
    time_min: int = 240
    mem_gb: float | None = None
    extra: dict | None = None  # --slurm-option KEY=VALUE: passed to sbatch as --KEY=VALUE
    poll_s: float | None = None

    def __post_init__(self):
        if self.kind not in EXECUTORS:
            raise ConfigError(f"--executor must be one of {', '.join(EXECUTORS)}, got {self.kind!r}")
        for name in ("gpus_per_cell", "cpus_per_cell"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "gpus_per_cell" else 1):
                raise ConfigError(f"--slurm-{name.replace('_', '-')} must be >= {0 if 'gpus' in name else 1}, "
                                  f"got {value}")
        if self.time_min < 1:
            raise ConfigError(f"--slurm-time must be >= 1 minute, got {self.time_min}")


class CellJob:
    """One cell as a submitit job (pickled into the job folder by submitit, run in the job's process). On SLURM,
    a job warned of preemption or of its time limit is requeued (`checkpoint`): the requeued job continues the
    cell from its newest training checkpoint."""

    def __init__(self, run_root: str, config: str, seed: int, threads: int | None = None,
                 trackers: tuple[str, ...] = ()):
        self.run_root, self.config, self.seed, self.threads = run_root, config, seed, threads
        self.trackers = trackers

    def __call__(self) -> dict | None:
        from lmlab import progress as bars
        from lmlab.studies.cell import log_line

        quiet_libraries()
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)

        signal.signal(signal.SIGTERM, _stop_cell)
        with bars.enabled(False):
            return compute_cell(self.run_root, self.config, self.seed,
                                Display(False, f"{self.config} seed {self.seed}", log_line, trackers=self.trackers))

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(CellJob(self.run_root, self.config, self.seed, self.threads,
                                                          self.trackers))


def _submitit():
    try:
        import submitit
    except ImportError:
        raise ConfigError("--executor needs submitit, which is not installed: pip install 'lmlab[cluster]'") from None
    return submitit


def make_executor(run: RunDir, options: ExecutorOptions, name: str):
    submitit = _submitit()
    folder = run.root / "jobs" / "%j"
    if options.kind == "local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=options.time_min, gpus_per_node=options.gpus_per_cell or 0)
        return executor
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    except RuntimeError as exc:  # submitit: 'Could not detect "srun", are you indeed on a slurm cluster?'
        raise ConfigError(f"--executor slurm needs SLURM's commands on this machine ({exc}); run from a SLURM "
                          "login node, or use --executor local to run the same jobs on this machine") from None
    params = {"name": name, "timeout_min": options.time_min, "nodes": 1, "tasks_per_node": 1,
              "gpus_per_node": 1 if options.gpus_per_cell is None else options.gpus_per_cell}
    if options.partition:
        params["slurm_partition"] = options.partition
    if options.cpus_per_cell:
        params["cpus_per_task"] = options.cpus_per_cell
    if options.mem_gb:
        params["mem_gb"] = options.mem_gb
    if options.extra:
        params["slurm_additional_parameters"] = dict(options.extra)
    executor.update_parameters(**params)
    return executor


def run_jobs(run: RunDir, todo: list[tuple[str, int]], options: ExecutorOptions, record: Callable[[dict], None],
             log: Callable[[str], None], threads: int | None = None, trackers: tuple[str, ...] = ()) -> list[str]:
    """Submit one job per cell of `todo` and record each row as its job finishes. A signal stops the waiting,
    not the jobs (they write their rows; `lmlab report` or `--resume` records them). Returns lines about cells
    whose job ended without a row (`--resume` submits them again)."""
    from lmlab.studies.cell import StudyInterrupted

    executor = make_executor(run, options, f"lmlab-{run.read_study()['study']}")
    if options.kind == "local" and threads is None and todo:  # local jobs share this machine's cores
        threads = max(1, len(os.sched_getaffinity(0)) // len(todo)) if hasattr(os, "sched_getaffinity") else None
    if options.kind == "slurm" and threads is None:
        threads = options.cpus_per_cell
    jobs = {}
    for config, seed in todo:
        jobs[(config, seed)] = executor.submit(CellJob(str(run.root), config, seed, threads, trackers))
    ids = {f"{c}/seed-{s}": job.job_id for (c, s), job in jobs.items()}
    index_path = run.root / "jobs" / "jobs.json"
    known = json.loads(index_path.read_text()) if index_path.exists() else {}
    atomic_write_text(index_path, json.dumps({**known, **ids}, indent=1) + "\n")
    log(f"submitted {len(jobs)} cell(s) as {options.kind} jobs ({', '.join(ids.values())}); their logs are in "
        f"{run.root / 'jobs'}")
    state = {"stop": None}

    def on_signal(signum, frame):
        state["stop"] = signum

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, on_signal)
    unfinished: list[str] = []
    poll = options.poll_s if options.poll_s is not None else (0.5 if options.kind == "local" else 15.0)
    try:
        while jobs and state["stop"] is None:
            for (config, seed), job in list(jobs.items()):
                if not job.done():
                    continue
                del jobs[(config, seed)]
                try:
                    row = job.result()
                except Exception as exc:  # the job itself failed (killed, out of memory, time limit): not the cell
                    last = str(exc).strip().splitlines()[-1:] or [type(exc).__name__]
                    unfinished.append(f"{config} seed {seed} (job {job.job_id} ended without a result: {last[0]})")
                    continue
                if row is None:
                    unfinished.append(f"{config} seed {seed} (another process is computing it)")
                else:
                    record(row)
            if jobs:
                time.sleep(poll)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if state["stop"] is not None:
        print(f"lmlab: {len(jobs)} job(s) still running: `lmlab report {run.root}` records their results when they "
              f"finish; `--resume` submits only cells without one", file=sys.stderr)
        raise StudyInterrupted(state["stop"])
    return unfinished
