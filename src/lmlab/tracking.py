"""Experiment trackers for a study's cells: `lmlab run STUDY --log tensorboard|wandb|mlflow` (several allowed).

Each cell is one tracker run, grouped by the study's run directory: its configuration (the study's config plus the
cell's name and seed), its training curve (every record of its `metrics.jsonl`: training loss, learning rate,
gradient norm every `train.log_every` steps; each evaluation) and, when it finishes, its result metrics and status.
A cell continued by `--resume` logs into the same tracker run:

- TensorBoard: event files in `<run>/tensorboard/<config>/seed-<s>/` (`tensorboard --logdir <run>/tensorboard`);
- W&B: project `$WANDB_PROJECT` or `lmlab-<study>`, group `<run directory name>`, run `<config>/seed-<s>` with an
  id derived from the run directory and the cell (so a resumed cell resumes its W&B run); offline (files under
  `<run>/wandb/`, `wandb sync` uploads them) when `WANDB_MODE=offline` or no API key is configured;
- MLflow: `$MLFLOW_TRACKING_URI`, else a local store in the run directory, `sqlite:///<run>/mlflow.db` (no server;
  `mlflow ui --backend-store-uri sqlite:///<run>/mlflow.db`; MLflow 3 keeps its `./mlruns` file store in maintenance
  mode); experiment `lmlab-<study>`, run `<config>/seed-<s>`, tagged `lmlab.cell` (how a resumed cell finds its
  run).

Records a resumed cell writes again (the steps between its checkpoint and the interruption: the same values, as
resume is exact) are not sent twice. Trackers are optional extras: `pip install 'lmlab[tracking]'`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import warnings
from pathlib import Path

from lmlab.errors import ConfigError

TRACKERS = ("tensorboard", "wandb", "mlflow")
_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def parse_trackers(values: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """`--log a,b --log c` -> ("a", "b", "c"), checked: known names, their libraries installed."""
    names: list[str] = []
    for value in values or ():
        for name in str(value).split(","):
            name = name.strip().lower()
            if not name:
                continue
            if name not in TRACKERS:
                raise ConfigError(f"--log {name!r} is not a tracker lmlab knows; choose from {', '.join(TRACKERS)}")
            if name not in names:
                names.append(name)
    for name in names:
        try:
            importlib.import_module(_MODULES[name])
        except ImportError:
            raise ConfigError(f"--log {name} needs the {name} package, which is not installed: "
                              "pip install 'lmlab[tracking]'") from None
    return tuple(names)


def _flat(value, prefix: str = "") -> dict[str, object]:
    """A nested config as `a.b.c` keys (lists as they are)."""
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def _numbers(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch")}


def _record_metrics(record: dict) -> dict[str, float]:
    """`train/loss`, `train/lr`, ..., `eval/val_ppl`: a metrics.jsonl record under its kind."""
    kind = record.get("kind", "train")
    return {f"{kind}/{k}": v for k, v in _numbers(record).items() if k != "kind"}


class CellTracker:
    """The tracker runs of one cell (one per tracker kind)."""

    def __init__(self, kinds: tuple[str, ...], run_root: Path, study: str, config: str, seed: int, params: dict):
        self.backends = []
        run_root = Path(run_root).resolve()
        cell_id = hashlib.sha1(f"{run_root}|{config}|{seed}".encode()).hexdigest()[:16]
        for kind in kinds:
            backend = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}[kind]
            try:
                self.backends.append(backend(run_root, study, config, seed, cell_id, params))
            except Exception as exc:  # the tracker's setup (its store, its login): one line, not a traceback
                self.close("failed")
                first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
                raise ConfigError(f"--log {kind}: {first[:300]}") from None

    def record(self, record: dict) -> None:
        step = int(record.get("step", 0))
        metrics = _record_metrics(record)
        if metrics:
            for backend in self.backends:
                if step > backend.held_through:
                    backend.log(metrics, step)

    def finish(self, row: dict) -> None:
        for backend in self.backends:
            backend.finish({k: float(v) for k, v in row.get("metrics", {}).items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)}, row.get("status", "ok"))

    def close(self, status: str = "interrupted") -> None:
        for backend in self.backends:
            with contextlib.suppress(Exception):
                backend.close(status)


@contextlib.contextmanager
def cell_tracker(kinds: tuple[str, ...], run_root: Path, study: str, config: str, seed: int, params: dict):
    """Open the cell's tracker runs (None without trackers); whatever happens, they are closed."""
    if not kinds:
        yield None
        return
    tracker = CellTracker(kinds, run_root, study, config, seed, params)
    status = "interrupted"
    try:
        yield tracker
        status = "finished"
    except Exception:
        status = "failed"
        raise
    finally:
        tracker.close(status)


class _Backend:
    held_through = -1  # the last step the tracker run held when this attempt opened it: later records are sent
    step = 0  # the last step logged (results are logged at it)

    def log(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def finish(self, metrics: dict[str, float], status: str) -> None:
        raise NotImplementedError

    def close(self, status: str) -> None:
        raise NotImplementedError


class _TensorBoard(_Backend):
    def __init__(self, run_root: Path, study: str, config: str, seed: int, cell_id: str, params: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.directory = run_root / "tensorboard" / config / f"seed-{seed}"
        self.held_through = _tensorboard_last_step(self.directory)
        # a resumed cell continues its event files; purge_step drops any event a killed attempt wrote after
        # the point this attempt goes on from (nothing: later records are only sent once)
        self.writer = SummaryWriter(log_dir=str(self.directory))
        if self.held_through < 0:
            self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in sorted(_flat(params).items())), 0)
        self.step = max(self.held_through, 0)

    def log(self, metrics, step):
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.step = max(self.step, step)
        self.writer.flush()

    def finish(self, metrics, status):
        for key, value in metrics.items():
            self.writer.add_scalar(f"result/{key}", value, self.step)
        self.writer.add_text("status", status, self.step)
        self.writer.flush()

    def close(self, status):
        self.writer.close()


def _tensorboard_last_step(directory: Path) -> int:
    if not directory.exists() or not any(directory.glob("events.out.tfevents.*")):
        return -1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    steps = [e.step for tag in events.Tags().get("scalars", []) for e in events.Scalars(tag)]
    return max(steps, default=-1)


class _WandB(_Backend):
    def __init__(self, run_root: Path, study: str, config: str, seed: int, cell_id: str, params: dict):
        import wandb

        mode = os.environ.get("WANDB_MODE")
        if mode is None:
            with contextlib.suppress(Exception):
                mode = None if wandb.api.api_key else "offline"
            mode = mode or ("offline" if not os.environ.get("WANDB_API_KEY") else None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT") or f"lmlab-{study}", group=run_root.name,
                name=f"{config}/seed-{seed}", id=f"lmlab-{cell_id}", resume="allow", dir=str(run_root),
                config={**params, "lmlab": {"config": config, "seed": seed, "run_dir": str(run_root)}},
                job_type=study, mode=mode, reinit="create_new", settings=wandb.Settings(silent=True, console="off"))
        self.held_through = int(getattr(self.run, "step", 0) or 0) - 1
        self.step = max(self.held_through, 0)

    def log(self, metrics, step):
        self.run.log(metrics, step=step)
        self.step = max(self.step, step)

    def finish(self, metrics, status):
        for key, value in metrics.items():
            self.run.summary[f"result/{key}"] = value
        self.run.summary["status"] = status

    def close(self, status):
        self.run.finish(exit_code=0 if status == "finished" else 1)


class _MLflow(_Backend):
    def __init__(self, run_root: Path, study: str, config: str, seed: int, cell_id: str, params: dict):
        import logging

        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # no INFO lines about creating the store's tables
            logging.getLogger(name).setLevel(logging.WARNING)
        from filelock import FileLock

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_root / 'mlflow.db'}"
        # cells of a --parallel run open the store at once: one creates its tables and the experiment
        with FileLock(str(run_root / ".mlflow.lock")), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.client = MlflowClient(tracking_uri=uri)
            name = f"lmlab-{study}"
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            found = self.client.search_runs([experiment_id], filter_string=f"tags.`lmlab.cell` = '{cell_id}'",
                                            max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            history = self.client.get_metric_history(self.run_id, "train/loss")
            self.held_through = max((m.step for m in history), default=-1)
            self.step = max(self.held_through, 0)
        else:
            tags = {"lmlab.cell": cell_id, "lmlab.run_dir": str(run_root), "lmlab.config": config,
                    "lmlab.seed": str(seed), "lmlab.study": study}
            self.run_id = self.client.create_run(experiment_id, tags=tags, run_name=f"{config}/seed-{seed}").info.run_id
            self.held_through = -1
            self._params({**_flat(params), "lmlab.config": config, "lmlab.seed": seed})

    def _params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k[:250], str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def _metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key.replace("@", "_at_"), value, now, step) for key, value in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def log(self, metrics, step):
        self._metrics(metrics, step)
        self.step = max(self.step, step)

    def finish(self, metrics, status):
        self._metrics({f"result/{k}": v for k, v in metrics.items()}, self.step)
        self.client.set_tag(self.run_id, "lmlab.status", status)

    def close(self, status):
        self.client.set_terminated(self.run_id, status={"finished": "FINISHED", "failed": "FAILED"}.get(status,
                                                                                                     "KILLED"))
