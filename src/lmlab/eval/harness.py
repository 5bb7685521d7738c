"""lm-evaluation-harness on any model lmlab trains or loads, in process, through lm-eval's own code.

`run_lm_eval(model, tokenizer, tasks)` wraps a loaded model - plain, merged, or with its HyLoRADA adapter - in
lm-eval's `HFLM(pretrained=model, tokenizer=tokenizer)` and runs `lm_eval.simple_evaluate` on task names: lm-eval's
built-in tasks, or tasks defined by YAML files in an `include_path` directory (e.g. over local data files,
`dataset_path: json` with `dataset_kwargs: {data_files: ...}`). It returns lm-eval's results dict (JSON-safe, without
per-sample logs); `lm_eval_scores` flattens it to `lm_eval/<task>/<metric>` numbers, which `lmlab eval lm-eval`
prints and the studies record as cell metrics (their `lm_eval:` field, `LmEvalConfig`). Nothing of lm-eval is
rewritten here: only its logging and progress bars are kept off the console.

lm-eval is an optional extra (`pip install 'lmlab[lmeval]'`), imported only inside these functions.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import logging
import math
import os
import random
import sys
import tempfile
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator

from lmlab.config import Section
from lmlab.errors import ConfigError, DataError

INSTALL_HINT = "pip install 'lmlab[lmeval]'"
PREFIX = "lm_eval/"
DEFAULT_BATCH_SIZE = 8
LM_EVAL_BOOTSTRAP_ITERS = 100_000  # lm-eval's own default (standard errors of metrics without a closed form)


class LmEvalConfig(Section):
    """lm-evaluation-harness after a cell's other metrics (a study's `lm_eval:` field): every finished cell's final
    model is evaluated on these tasks, and the scores become cell metrics named `lm_eval/<task>/<metric>`."""

    tasks: list[str] = Field(min_length=1, description="lm-eval task (or group) names, or task YAML files")
    limit: int | None = Field(None, ge=1, description="at most this many examples per task (None: all)")
    include_path: str | None = Field(None, description="a directory of task YAML files (relative to the current "
                                     "directory): tasks of your own, e.g. over local data files")
    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1)

    @field_validator("tasks")
    @classmethod
    def _task_names(cls, value: list[str]) -> list[str]:
        names = [str(v).strip() for v in value]
        if any(not n for n in names):
            raise ValueError("a task name is empty")
        return list(dict.fromkeys(names))

    @field_validator("include_path")
    @classmethod
    def _directory(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not is_directory(value):
            raise ValueError(f"{value} is not a directory (a directory of lm-eval task YAML files, relative to the "
                             f"current directory {Path.cwd()})")
        return str(Path(value).expanduser().resolve())  # recorded absolute: `--resume` elsewhere finds it


def is_directory(value: str) -> bool:
    """Whether `value` (`~` expanded) names a directory; False for names no file system holds."""
    try:
        return Path(value).expanduser().is_dir()
    except (OSError, ValueError, RuntimeError):  # a name too long, a NUL byte, an unknown ~user
        return False


def require_lm_eval() -> None:
    """ConfigError (one line) when lm-eval cannot be imported."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        if exc.name in (None, "lm_eval"):
            raise ConfigError(f"lm-eval is not installed: {INSTALL_HINT}") from None
        raise ConfigError(f"lm-eval is installed but cannot be imported ({exc}); reinstall: {INSTALL_HINT}") from None


def _yaml_signature(include_path: str | None) -> tuple:
    """The YAML files under `include_path` with their modification times: a changed task directory is indexed again."""
    if include_path is None:
        return ()
    files = sorted(p for p in Path(include_path).rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
    return tuple((str(p), p.stat().st_mtime_ns) for p in files)


@lru_cache(maxsize=8)
def _index(include_path: str | None, defaults: bool, _signature: tuple):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=defaults)


def _known(manager, name: str) -> bool:
    return name in manager.all_tasks or (name.endswith((".yaml", ".yml")) and Path(name).is_file())


def task_manager(tasks: Sequence[str], include_path: str | None = None):
    """lm-eval's `TaskManager` that knows every one of `tasks`; a ConfigError names one it does not know.

    When the YAML files under `include_path` define every task, only they are indexed (lm-eval's ~15,000 built-in
    names take seconds to index); otherwise the built-in tasks and those files. Managers are reused in a process."""
    require_lm_eval()
    if include_path is not None:
        if not is_directory(include_path):
            raise ConfigError(f"include path {include_path} is not a directory of lm-eval task YAML files")
        include_path = str(Path(include_path).expanduser().resolve())
        local = _index(include_path, False, _yaml_signature(include_path))
        if all(_known(local, t) for t in tasks):
            return local
    manager = _index(include_path, True, _yaml_signature(include_path))
    unknown = [t for t in tasks if not _known(manager, t)]
    if unknown:
        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=1, cutoff=0.6)
        where = f" or under {include_path}" if include_path else ""
        raise ConfigError(f"lm-eval has no task '{unknown[0]}'{f'; did you mean {close[0]!r}?' if close else ''} "
                          f"(not among its built-in tasks{where}; `lm-eval ls tasks` lists them, and a task of your "
                          "own is a YAML file in an include-path directory)")
    return manager


class _Loading:
    """The task manager, with a task that cannot be built (its data missing, unreachable offline or malformed, its
    YAML invalid) reported as one line instead of a traceback. A manager of the include path's tasks alone retries
    a group or tag with the built-in tasks indexed too (a group of your own may name built-in tasks)."""

    def __init__(self, manager, include_path: str | None):
        self._manager = manager
        self._include_path = include_path

    def load(self, task_list):
        try:
            return self._manager.load(task_list)
        except Exception as exc:  # lm-eval and datasets raise many types here, all about the task or its data
            failure = exc
        groups = [t for t in task_list if str(t) not in self._manager.all_subtasks]  # groups and tags
        if self._include_path is not None and groups:
            path = str(Path(self._include_path).expanduser().resolve())
            full = _index(path, True, _yaml_signature(path))
            if full is not self._manager:
                try:
                    loaded = full.load(task_list)
                except Exception as exc:
                    failure = exc
                else:
                    self._manager = full
                    return loaded
        first = (str(failure).strip().splitlines() or [type(failure).__name__])[0]
        raise DataError(f"lm-eval could not load task(s) {', '.join(map(str, task_list))}: "
                        f"{type(failure).__name__}: {first}") from None

    def __getattr__(self, name):
        return getattr(self._manager, name)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval's log records below ERROR, its progress bars, its libraries' warnings and what the programs it starts
    print (`git describe` outside a repository, torch's environment report) off the console: stderr - Python's and
    file descriptor 2 - is captured for the block and shown only when the block fails with an unexpected error."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    bars_were_on = None
    try:
        from datasets.utils import logging as ds_logging

        bars_were_on = ds_logging.is_progress_bar_enabled()
        ds_logging.disable_progress_bar()
    except ImportError:
        pass
    captured = io.StringIO()
    real_stderr = sys.stderr
    with tempfile.TemporaryFile() as fd_file:
        saved_fd = None
        try:
            sys.__stderr__.flush()
            saved_fd = os.dup(2)
            os.dup2(fd_file.fileno(), 2)
        except (OSError, AttributeError, ValueError):  # no file descriptor 2 (an embedding host): Python's only
            saved_fd = None
        try:
            with contextlib.redirect_stderr(captured):
                yield
        except Exception as exc:
            if saved_fd is not None:
                os.dup2(saved_fd, 2)
            fd_file.seek(0)
            said = fd_file.read().decode("utf-8", "replace") + captured.getvalue()
            if not isinstance(exc, (ConfigError, DataError)) and said.strip():
                real_stderr.write(said[-20_000:].rstrip() + "\n")  # what lm-eval said before it failed
            raise
        finally:
            if saved_fd is not None:
                os.dup2(saved_fd, 2)
                os.close(saved_fd)
            logger.setLevel(level)
            if bars_were_on:
                ds_logging.enable_progress_bar()


@contextlib.contextmanager
def _generators_kept() -> Iterator[None]:
    """The caller's random, numpy and torch generator states, as they were before the block: simple_evaluate seeds
    them all (for its few-shot sampling), which must not change what a study computes after it."""
    import numpy as np
    import torch

    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def run_lm_eval(model, tokenizer, tasks: str | Sequence[str], *, limit: int | None = None,
                include_path: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE, num_fewshot: int | None = None,
                bootstrap_iters: int = LM_EVAL_BOOTSTRAP_ITERS, log_samples: bool = False) -> dict:
    """lm-eval's `simple_evaluate` on `model` (a loaded Hugging Face causal LM, with or without an lmlab adapter: it
    is evaluated as it is, on the device it is on) through lm-eval's `HFLM` wrapper; returns lm-eval's results dict,
    JSON-safe (`results`, `configs`, `versions`, `n-shot`, `higher_is_better`, `n-samples`, `config`, ...; `samples`
    only with `log_samples`).

    `tasks`: task or group names (a comma-separated string or a list), built-in or defined by YAML files under
    `include_path`; `limit`: examples per task; `bootstrap_iters`: lm-eval's bootstrap for standard errors that
    have no closed form (0 skips them). Unknown tasks and lm-eval missing are ConfigErrors, a task whose data cannot
    be loaded a DataError (one line each). The caller's random generator states are left as they were.
    """
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    tasks = list(tasks)
    if not tasks:
        raise ConfigError("lm-eval needs at least one task name")
    manager = task_manager(tasks, include_path)
    import json

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import handle_non_serializable

    with _quiet(), _generators_kept():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = simple_evaluate(lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                                  task_manager=_Loading(manager, include_path), bootstrap_iters=bootstrap_iters,
                                  log_samples=log_samples)
    if results is None:  # lm-eval returns results on its rank 0 only (LOCAL_RANK 0 under torchrun)
        raise RuntimeError("lm-eval returned no results on this process (LOCAL_RANK != 0): evaluate on rank 0")
    if not log_samples:
        results.pop("samples", None)
    return json.loads(json.dumps(results, default=handle_non_serializable))


def lm_eval_scores(results: dict) -> dict[str, float]:
    """lm-eval's results flattened to `{"lm_eval/<task>/<metric>": value}` for every task and group: lm-eval's
    metric keys `<metric>,<filter>` become `<metric>` for the default filter `none` and stay `<metric>,<filter>`
    otherwise; standard errors, counts, names and non-numeric or non-finite values are left out."""
    scores: dict[str, float] = {}
    for task, entry in sorted((results.get("results") or {}).items()):
        for key, value in entry.items():
            metric, comma, filter_name = str(key).partition(",")
            if not comma or metric.endswith("_stderr"):  # `alias`, `name`, `sample_len` carry no comma
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            name = metric if filter_name == "none" else f"{metric},{filter_name}"
            scores[f"{PREFIX}{task}/{name}"] = float(value)
    return scores


def cell_scores(model, tokenizer, config: LmEvalConfig) -> dict[str, float]:
    """A study cell's lm-eval scores (`lm_eval_scores`) of its final model. lm-eval's wrapper of a model instance
    runs in one process: under torchrun rank 0 evaluates and every rank gets its scores (or its error)."""
    from lmlab.engine import distributed as D

    outcome, failure = None, None
    if D.is_main():
        try:
            outcome = ("ok", lm_eval_scores(run_lm_eval(model, tokenizer, config.tasks, limit=config.limit,
                                                        include_path=config.include_path,
                                                        batch_size=config.batch_size, bootstrap_iters=0)))
        except Exception as exc:
            failure = exc
            outcome = ("error", type(exc).__name__, str(exc))
    outcome = D.broadcast_object(outcome)
    if failure is not None:
        raise failure
    if outcome[0] == "error":
        raise {"ConfigError": ConfigError, "DataError": DataError}.get(outcome[1], RuntimeError)(outcome[2])
    return outcome[1]
