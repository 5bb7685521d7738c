"""The study harness: named configurations x seeds, one cell at a time, resumable (docs/protocol.md sections 5-6).

Each cell trains and evaluates in its own directory; `results.jsonl` gets one line when it finishes.
A failed cell (an error, a non-finite loss) is recorded and the study goes on. SIGINT/SIGTERM stop the
run between writes: finished cells stay; a cell stopped while training finishes its optimizer step and writes a
checkpoint of its training state (`cells/<config>/seed-<s>/train_state/`, also written every
`train.checkpoint_every` steps and `train.checkpoint_minutes`), so `--resume DIR` continues it from there - the same
steps, metrics and weights as a run never stopped - and a cell with no checkpoint yet starts again. Nothing already
finished is recomputed. Bad input (an `LmlabError`) stops the study
with its one-line message, keeping every finished cell.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from lmlab import cpu_share
from lmlab import progress as bars
from lmlab.config import Section, build, load_config, preset_path
from lmlab.engine import distributed as D
from lmlab.engine.hooks import Display
from lmlab.engine.interrupt import STOP, deliver_later, in_finalizer
from lmlab.engine.train import check_batch_split
from lmlab.errors import ConfigError, LmlabError
from lmlab.studies.cell import StudyInterrupted, compute_row, log_line
from lmlab.studies.parallel import (
    ExecutorOptions,
    collect_cell_results,
    plan_slots,
    resolve_parallel,
    run_jobs,
    run_parallel,
)
from lmlab.studies.registry import declarations, get_study
from lmlab.studies.rundir import RunDir, library_versions
from lmlab.tracking import parse_trackers

SEEDS = [42, 123, 456, 789, 1011, 2027, 3037, 4049, 5051, 6067]


def seed_list(n: int) -> list[int]:
    """The first `n` seeds of 42, 123, 456, 789, 1011, ... (continued deterministically past the list)."""
    if n < 1:
        raise ConfigError(f"--seeds must be >= 1, got {n}")
    return (SEEDS + [10_000 + 1_000 * i for i in range(max(0, n - len(SEEDS)))])[:n]


class StudyConfig(Section):
    """Fields every study config has."""

    seeds: list[int] = Field(default_factory=lambda: SEEDS[:3], min_length=1)
    seed: int | None = Field(None, description="run this one seed (the notes' --seed flag)")
    only: list[str] | None = Field(None, description="run only these configurations (plus the reference)")
    # A preset for tiny models may pin this: on a busy 2-core machine a tiny model's step is up to 20x slower on 2
    # threads than on 1.
    threads: int | None = Field(None, ge=1, description="torch CPU threads per process (overrides --threads)")
    # What `--parallel` does when the command gives none; a preset whose cells run on one thread sets 'auto' (on
    # CPU: one cell per `threads` cores). It yields to --nproc and --executor instead of conflicting with them.
    parallel: int | Literal["auto"] | None = Field(None, description="cells computed at once where the command "
                                                   "gives no --parallel: a number >= 1 or 'auto'")

    @field_validator("parallel")
    @classmethod
    def _parallel(cls, value):
        if isinstance(value, int) and value < 1:
            raise ValueError("must be a number >= 1 or 'auto'")
        return value

    @model_validator(mode="after")
    def _one_seed(self):
        if self.seed is not None:
            self.__dict__["seeds"] = [self.seed]
        return self


@dataclass
class CellOutput:
    """What a cell produced: scalar metrics, richer details (curves, per-depth values), parameter counts."""

    metrics: dict[str, float]
    details: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)


class Study:
    """A recipe: which configurations exist, how one cell runs, what the report adds."""

    name: str = ""
    config_cls: type[StudyConfig] = StudyConfig
    primary_metric: str = "val_ppl"
    lower_is_better: bool = True

    def configurations(self, cfg) -> list[str]:
        raise NotImplementedError

    def reference(self, cfg) -> str:
        raise NotImplementedError

    def candidate(self, cfg) -> str:
        raise NotImplementedError

    def table_metrics(self, cfg) -> list[str]:
        """Metrics of the main table (mean ± std)."""
        return [self.primary_metric]

    def change_metrics(self, cfg) -> list[str]:
        """Metrics whose paired change vs the reference the report tabulates."""
        return [self.primary_metric]

    def setting(self, cfg) -> list[str]:
        """The run's setting in words (models, data, context, training), one line each, for the report's
        `## Setting` section (`lmlab.studies.setting`)."""
        return []

    def comparisons(self, cfg) -> list[dict] | None:
        """Attribution (`lmlab.studies.attribution`): [{component, candidate, parent, controls, headline}], each a
        component judged against the configuration it is added to and its controls. None: every configuration
        against the reference, the candidate as the headline."""
        return None

    def roles(self, cfg) -> dict[str, dict]:
        """{configuration: {role, note, invalid}} - e.g. a control's note says what it rules out."""
        return {}

    def claims(self, cfg) -> list[dict]:
        """The research notes' claims the report confronts (`attribution.judge_claim` specs)."""
        return []

    def param_match_ratio(self, cfg) -> float | None:
        """Configurations training more than this many times the reference's parameters (or base weights) are
        marked as not parameter-matched; None: no parameter matching in this study."""
        return None

    def prepare(self, cfg, run: RunDir, display: Display):
        """Shared resources of all cells (cached base models, data); returns a context object. `display` is how
        loops show themselves (progress bars, one-line messages): pass `display.named(...)` to `train`."""
        return None

    def run_cell(self, ctx, config: str, seed: int, cell_dir: Path, display: Display) -> CellOutput:
        raise NotImplementedError

    def stage_notes(self) -> dict[str, str]:
        """{configuration: what its last stage trains} for configurations whose cells train in stages (each earlier
        stage's curve in `metrics-<stage>.jsonl`), for the training-curve plot's marker where that last stage
        starts."""
        return {}

    def report_sections(self, summary: dict, rows: list[dict], run: RunDir, study_record: dict) -> list[str]:
        """Extra markdown sections (and plots) for this study's report."""
        return []

    def extra_summary(self, summary: dict, rows: list[dict], run: RunDir, study_record: dict) -> dict:
        """Study-specific entries merged into summary.json before the report is written (e.g. paired tests over
        evaluation items read from the cells' files); its `claims` are appended to the summary's."""
        return {}


def selected_configurations(study: Study, cfg) -> list[str]:
    names = study.configurations(cfg)
    if cfg.only:
        unknown = [c for c in cfg.only if c not in names]
        if unknown:
            raise ConfigError(f"only={unknown} names no configuration of study '{study.name}'; "
                              f"configurations are {', '.join(names)}")
        keep = set(cfg.only) | {study.reference(cfg)}
        names = [n for n in names if n in keep]
    return names


class _Signals:
    """SIGINT/SIGTERM raise StudyInterrupted, except inside `recording()`, where the signal is held
    until the block ends (a finished cell's result line and its directory are kept together), and while a training
    loop runs, which takes the first signal as a request to checkpoint and stop (lmlab.engine.interrupt)."""

    def __init__(self):
        self.recording_depth = 0
        self.pending: int | None = None

    def handle(self, signum, frame):
        if self.recording_depth:
            self.pending = signum
            return
        if in_finalizer(frame):  # an exception raised there is printed as a traceback and dropped: a moment later
            deliver_later(signum)
            return
        if STOP.request(signum):  # training stops at its next step boundary, after a checkpoint
            return
        raise StudyInterrupted(signum)

    @contextlib.contextmanager
    def recording(self):
        self.recording_depth += 1
        try:
            yield
        finally:
            self.recording_depth -= 1
        if not self.recording_depth and self.pending is not None:
            signum, self.pending = self.pending, None
            raise StudyInterrupted(signum)


SIGNALS = _Signals()


def _default_out(study: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{study}-{stamp}"


def run_study(name: str, *, preset: str | None = None, overrides: list[str] = (), out: str | None = None,
              seeds: int | None = None, resume: str | None = None, progress: bool = True,
              parallel: int | str | None = None, executor: ExecutorOptions | None = None,
              log: list[str] | tuple[str, ...] = ()) -> Path:
    """Run (or finish) every configuration x seed of study `name`; returns the run directory. `preset`: the
    `default` preset unless given (a new run only: `resume` continues with the run's own configuration).
    `parallel`: cells computed at once on this machine (a number or 'auto': one per GPU, or on CPU one per
    `threads` cores where the config pins `threads`; None: the config's `parallel`, else 1); `executor`: one
    submitit job per cell (SLURM, or submitit's local executor) - see lmlab.studies.parallel. `log`: experiment
    trackers each cell logs to (tensorboard, wandb, mlflow: lmlab.tracking)."""
    plan = check_run(name, preset=preset, overrides=overrides, out=out, seeds=seeds, resume=resume,
                     parallel=parallel, executor=executor, log=log)
    study, cfg, run, record = plan.study, plan.cfg, plan.run, plan.record
    if resume:
        if D.is_main():
            run.check_writable()
            run.lock()  # a second process on this directory stops here, naming this one
    else:
        run = RunDir(Path(D.broadcast_object(str(run.root))))
        if D.is_main():
            run.create()  # refuses a used directory; fails here, before any training, when unwritable
            run.lock()
        record = {
            **record, **declarations(study, cfg, record["configurations"]),
            "config": cfg.model_dump(mode="json"),
            "versions": library_versions(), "started": datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(["lmlab", *sys.argv[1 + (sys.argv[1:2] == ["--"]):]]) if sys.argv else "",
        }
        run.write_study(record)
        D.barrier()
    workers, trackers = plan.workers, plan.trackers
    try:
        with bars.enabled(progress):  # bars for evaluation, generation and data that take seconds
            _execute(study, cfg, run, record, Display(progress, study.name, log_line, trackers=trackers),
                     Placement(workers, executor))
    except LmlabError:
        if not resume:  # bad input found before any cell finished: the directory is left unclaimed
            run.withdraw()
        raise
    except KeyboardInterrupt as exc:  # the CLI's message names the command that continues this run
        exc.study, exc.run_dir = name, run.root
        raise
    finally:
        run.unlock()
    return run.root


@dataclass
class RunPlan:
    """What `check_run` found: the study, its validated config, the run directory (not yet created or claimed), the
    run's study.yaml record so far (a new run: without declarations, config and versions), cell workers and
    trackers."""

    study: Study
    cfg: StudyConfig
    run: RunDir
    record: dict
    workers: int
    trackers: list


def check_run(name: str, *, preset: str | None = None, overrides: list[str] = (), out: str | None = None,
              seeds: int | None = None, resume: str | None = None, parallel: int | str | None = None,
              executor: ExecutorOptions | None = None, log: list[str] | tuple[str, ...] = (),
              world: int | None = None) -> RunPlan:
    """Every check `run_study` makes of its input, for `world` processes (default: this job's), without creating,
    claiming or writing anything: a launcher (`--nproc N`) calls it before it starts N processes, so bad input is
    one line from one process, not one per rank and a launcher's traceback."""
    world = D.world_size() if world is None else world
    D.device_choice()  # a bad LMLAB_DEVICE: refused before anything is said or read
    study = get_study(name)
    trackers = parse_trackers(log)
    resolve_parallel(parallel)  # a malformed --parallel: refused before anything is read
    if out is not None and not str(out).strip() and not resume:
        raise ConfigError("--out '' names no directory: give a path, or leave --out out for runs/<study>-<time>")
    if resume:
        run = RunDir(Path(resume))
        record = run.read_study()
        if record["study"] != name:
            raise ConfigError(f"{resume} holds a '{record['study']}' study, not '{name}': continue it with "
                              f"`lmlab run {record['study']} --resume {resume}`")
        given = [what for what, present in (("the overrides", overrides), ("--seeds", seeds is not None),
                                            ("--preset", preset is not None), ("--out", out is not None)) if present]
        if given:
            raise ConfigError(f"--resume continues a run in its own directory with its saved configuration "
                              f"(study.yaml, preset '{record['preset']}'); drop {' and '.join(given)}, or start a "
                              "new run with --out")
        cfg = build(study.config_cls, record["config"], where=str(run.study_path))
        check_batch_split(cfg, world)
        workers = _workers(parallel, cfg, executor, world)
        return RunPlan(study, cfg, run, record, workers, trackers)
    preset = preset or "default"
    if seeds is not None:
        chosen = [o.split("=", 1)[0].strip() for o in overrides if o.split("=", 1)[0].strip() in ("seeds", "seed")]
        if chosen:
            raise ConfigError(f"--seeds {seeds} and the override {chosen[0]}=... both choose the seeds; drop one")
        overrides = [*overrides, f"seeds=[{', '.join(map(str, seed_list(seeds)))}]", "seed=null"]
    cfg = load_config(study.config_cls, preset_path(name, preset), overrides)
    check_batch_split(cfg, world)  # the global batch splits across the processes, before any file
    workers = _workers(parallel, cfg, executor, world)
    configs = selected_configurations(study, cfg)
    run = RunDir(Path(out or _default_out(name)))
    if out is not None:
        run.check_new()
    record = {
        "study": name, "preset": preset, "seeds": list(cfg.seeds), "configurations": configs,
        "reference": study.reference(cfg), "candidate": study.candidate(cfg),
        "primary_metric": study.primary_metric, "lower_is_better": study.lower_is_better,
        "table_metrics": study.table_metrics(cfg), "change_metrics": study.change_metrics(cfg),
    }
    return RunPlan(study, cfg, run, record, workers, trackers)


def _workers(parallel: int | str | None, cfg: StudyConfig, executor: ExecutorOptions | None,
             world: int | None = None) -> int:
    """Worker processes for the cells: `--parallel` as given, else the config's `parallel` where neither DDP nor
    an executor runs the cells (a preset's default yields to them); too many for the machine: refused here, before
    any directory is made. `world`: the DDP processes (default: this job's)."""
    world = D.world_size() if world is None else world
    asked = "--parallel {}"
    if parallel is None and cfg.parallel is not None and executor is None and world == 1:
        parallel, asked = cfg.parallel, "parallel={}"
    workers = resolve_parallel(parallel, cfg.threads)
    if (workers > 1 or executor is not None) and world > 1:
        raise ConfigError("--parallel and --executor run each cell in its own process; they do not combine with "
                          "--nproc (DDP): drop one of them")
    if workers > 1 and executor is not None:
        raise ConfigError("--parallel runs cells on this machine, --executor as jobs; choose one")
    if workers > 1:
        plan_slots(workers, asked=asked)
    return workers


@dataclass
class Placement:
    """Where cells run: this process one after another (the default), `workers` processes side by side, or one
    submitit job each."""

    workers: int = 1
    executor: ExecutorOptions | None = None


def _execute(study: Study, cfg, run: RunDir, record: dict, display: Display,
             placement: Placement | None = None) -> None:
    from lmlab.studies.report import write_reports

    placement = placement or Placement()
    configs = record["configurations"]
    seeds = record["seeds"]
    if D.is_main():
        collected = collect_cell_results(run)  # rows that jobs of an earlier submission wrote
        if collected:
            log_line(f"recorded {collected} cell(s) that jobs finished after the last run stopped")
    D.barrier()
    finished = {(r["config"], r["seed"]) for r in run.read_results()}
    todo = [(c, s) for s in seeds for c in configs if (c, s) not in finished]
    total = len(configs) * len(seeds)
    if finished:
        log_line(f"resuming {run.root}: {len(finished)} of {total} cells already finished")
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, SIGNALS.handle)
    try:
        if placement.workers > 1 or placement.executor is not None:
            _execute_elsewhere(study, cfg, run, todo, finished, total, display, placement)
        else:
            if cfg.threads is not None and D.device().type == "cpu":
                torch.set_num_threads(cfg.threads)
            ctx = study.prepare(cfg, run, display) if todo else None  # checks the data and models (bad input: exit 2)
            if todo and cpu_share.NOTE:
                log_line(f"lmlab: {cpu_share.NOTE[-1]}")
            started = time.perf_counter()
            for done, (config, seed) in enumerate(todo, start=1):
                _run_cell(study, ctx, run, config, seed, display, index=len(finished) + 1, total=total,
                          eta=partial(eta_text, started, done, len(todo) - done))
                finished.add((config, seed))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if D.is_main():
        write_reports(run)


def _execute_elsewhere(study: Study, cfg, run: RunDir, todo: list, finished: set, total: int, display: Display,
                       placement: Placement) -> None:
    """The cells of `todo` in worker processes or jobs; this process records their rows as they finish."""
    if not todo:
        return
    started = time.perf_counter()
    cell_seconds: list[float] = []
    workers = min(placement.workers, len(todo))

    def record(row: dict) -> None:
        with SIGNALS.recording():
            run.append_result(row)
        run.drop_checkpoints(row["config"], row["seed"])
        finished.add((row["config"], row["seed"]))
        done = sum(1 for cell in todo if cell in finished)
        if placement.executor is None and isinstance(row.get("time_s"), (int, float)):
            cell_seconds.append(row["time_s"])
            eta = partial(workers_eta_text, cell_seconds, len(todo) - done, workers)
        else:  # jobs: as many run at once as the scheduler allows
            eta = partial(eta_text, started, done, len(todo) - done)
        _log_row(study, row, len(finished), total, eta)

    if placement.executor is not None:
        unfinished = run_jobs(run, todo, placement.executor, record, log_line, cfg.threads, display.trackers)
    else:
        slots = plan_slots(min(placement.workers, len(todo)), cfg.threads)
        where = ("GPU " + ", ".join(str(s.gpu) for s in slots) if slots[0].gpu is not None
                 else f"{len(slots[0].cores)} core(s) and {slots[0].threads} thread(s) each")
        log_line(f"{len(todo)} cell(s) on {len(slots)} worker processes ({where})")
        if cpu_share.NOTE:
            log_line(f"lmlab: {cpu_share.NOTE[-1]}")
        unfinished = run_parallel(run, todo, slots, display, record, log_line)
    if unfinished:
        log_line(f"{len(unfinished)} cell(s) did not finish: {'; '.join(unfinished)}. The report covers the others; "
                 f"`lmlab run {study.name} --resume {run.root}` computes them")


def duration_text(seconds: float) -> str:
    """`45s`, `2m10s`, `3h05m`."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def eta_text(started: float, done: int, remaining: int) -> str:
    """`, eta 2m10s` for the cells left, at the pace of the `done` cells this process computed since `started`;
    empty when none is left."""
    if remaining <= 0 or done <= 0:
        return ""
    return f", eta {duration_text((time.perf_counter() - started) / done * remaining)}"


def workers_eta_text(cell_seconds: list[float], remaining: int, workers: int) -> str:
    """`eta_text` for cells computed `workers` at a time: the finished cells' mean duration times the cells left,
    shared by the workers. (Wall clock since the start over the cells done would count the cells still in flight
    as not started: the first cell to finish would predict twice the time with two workers.)"""
    if remaining <= 0 or not cell_seconds:
        return ""
    return f", eta {duration_text(sum(cell_seconds) / len(cell_seconds) * remaining / max(1, workers))}"


def _run_cell(study: Study, ctx, run: RunDir, config: str, seed: int, display: Display, index: int,
              total: int, eta: Callable[[], str] = str) -> None:
    recorded = False
    try:
        row = compute_row(study, ctx, run, config, seed, display)
        with SIGNALS.recording():
            run.append_result(row)
            recorded = True
    except (KeyboardInterrupt, LmlabError):
        if not recorded:  # the partial cell goes, unless it has a training checkpoint `--resume` continues from
            run.discard_cell(config, seed, keep_checkpoint=True)
        raise
    run.drop_checkpoints(config, seed)  # the cell is recorded: its training state is no longer needed
    _log_row(study, row, index, total, eta)


def _log_row(study: Study, row: dict, index: int, total: int, eta: Callable[[], str] = str) -> None:
    config, seed = row["config"], row["seed"]
    if row["status"] == "ok":
        shown_keys = [study.primary_metric] + [k for k in row["metrics"] if k != study.primary_metric][:2]
        shown = ", ".join(f"{k} {row['metrics'][k]:.4g}" for k in shown_keys
                          if isinstance(row["metrics"].get(k), (int, float)))
        log_line(f"[{index}/{total}] {config} seed {seed}: {shown} ({row['time_s']:.0f}s{eta()})")
    else:
        log_line(f"[{index}/{total}] {config} seed {seed}: FAILED - {row['error']}{eta()}")
