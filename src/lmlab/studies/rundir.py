"""The one run-directory writer (docs/protocol.md section 6).

```
<run>/study.yaml      resolved configuration (+ lmlab and library versions)
<run>/results.jsonl   one line per finished cell
<run>/cells/<config>/seed-<s>/   config.json, metrics.jsonl, eval_samples.jsonl, artifacts,
                                 train_state/ (training checkpoints while the cell is unfinished)
<run>/summary.json report.md report.tex results.csv plots/*.png
```
Every write is atomic (temporary file + rename): a killed run never leaves a half-written file.
Only rank 0 writes. The process running a directory holds `<run>/.lock` (flock) while it runs, so two processes
never compute the same cells.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import platform
import shutil
from datetime import datetime
from pathlib import Path

import yaml

from lmlab.engine import distributed as D
from lmlab.engine.state import complete_checkpoints
from lmlab.errors import ConfigError
from lmlab.fileio import atomic_write_text, dump_yaml, parse_yaml, probe_writable


def json_safe(value):
    """Replace NaN/inf (not JSON) by None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps(value) -> str:
    return json.dumps(json_safe(value), indent=2, allow_nan=False)


def library_versions() -> dict:
    import importlib.metadata as md

    import lmlab

    versions = {"lmlab": lmlab.__version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "datasets", "tokenizers", "safetensors", "pydantic", "scipy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return versions


# What `--resume` and `lmlab report` read from a run directory's files.
STUDY_KEYS = ("study", "preset", "seeds", "configurations", "reference", "candidate", "primary_metric", "config")
RESULT_KEYS = ("config", "seed", "status", "metrics")
LOCK_NAME = ".lock"
TRAIN_STATE = "train_state"  # a cell's training checkpoints (lmlab.engine.state), kept when a run is stopped


def _describe_holder(text: str) -> str:
    """The lock file's record of its holder, as words."""
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (ValueError, TypeError, KeyError):
        return "holder unknown"


def _hashable(*values) -> bool:
    try:
        hash(values)
    except TypeError:
        return False
    return True


def unique_results(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(the first row of each (config, seed), the later duplicates): two processes that once ran the same
    directory at the same time can have recorded a cell twice."""
    seen: set = set()
    kept, dropped = [], []
    for row in rows:
        key = (row["config"], row["seed"])
        if not _hashable(key):  # not a cell of this run (a list for a seed): kept for the report to handle
            kept.append(row)
            continue
        (kept if key not in seen else dropped).append(row)
        seen.add(key)
    return kept, dropped


class RunDir:
    def __init__(self, root: Path):
        self.root = Path(root)
        self._lock_fd: int | None = None
        self._made_root = False  # create() made the directory itself (withdraw() may remove it)
        self.duplicates: list[dict] = []  # rows read_results() dropped: later records of an already recorded cell

    # paths
    @property
    def results_path(self) -> Path:
        return self.root / "results.jsonl"

    @property
    def study_path(self) -> Path:
        return self.root / "study.yaml"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def cell_dir(self, config: str, seed: int) -> Path:
        return self.root / "cells" / config / f"seed-{seed}"

    # creation
    def check_new(self) -> None:
        """The refusals of `create` that need nothing written: a path that is a file, or a directory that holds
        anything (an earlier run) - so a launcher can refuse them before it starts processes."""
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"output path {self.root} is a file, not a directory; choose another --out")
        if self.root.exists() and any(self.root.iterdir()):
            raise ConfigError(f"output directory {self.root} already exists and is not empty; continue it with "
                              f"--resume {self.root}, or choose another --out")
        for parent in self.root.parents:  # a file where a parent directory should be (--out afile/sub)
            if parent.exists():
                if not parent.is_dir():
                    raise ConfigError(f"cannot write to the output directory {self.root}: {parent} is a file, "
                                      "not a directory; choose another --out")
                break

    def create(self) -> None:
        """Claim a new run directory, before any training starts: a path that is a file, or a directory that
        holds anything (an earlier run), is refused, never overwritten. study.yaml is created exclusively, so
        two runs started at once (the same --out, or the same default name) cannot share a directory, and
        creating it proves the directory is writable."""
        self.check_new()
        try:
            self._made_root = not self.root.exists()
            self.root.mkdir(parents=True, exist_ok=True)
            with open(self.study_path, "x", encoding="utf-8"):
                pass
        except FileExistsError:
            raise ConfigError(f"output directory {self.root} was just claimed by another run started at the same "
                              f"time; choose another --out") from None
        except OSError as exc:
            raise ConfigError(self._unwritable(exc)) from None

    # locking
    @property
    def lock_path(self) -> Path:
        return self.root / LOCK_NAME

    def lock(self) -> None:
        """Hold the run directory for this process (an exclusive `flock` on `<run>/.lock`, released when the
        process ends, however it ends, or by `unlock()`): a second `lmlab run` on the same directory (a second
        `--resume`) is refused naming the holder instead of computing the same cells again. Rank 0 only."""
        if not D.is_main() or self._lock_fd is not None:
            return
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise ConfigError(self._unwritable(exc)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise ConfigError(f"run directory {self.root} is in use by another lmlab process "
                              f"({_describe_holder(holder)}); wait for it to finish (or stop it), then "
                              f"`--resume {self.root}` continues") from None
        os.ftruncate(fd, 0)
        holder = {"pid": os.getpid(), "host": platform.node(),
                  "started": datetime.now().isoformat(timespec="seconds")}
        os.pwrite(fd, (json.dumps(holder) + "\n").encode("utf-8"), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        """Let the directory go (the lock file stays; only a process holding its flock holds the run)."""
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)

    def withdraw(self) -> None:
        """Undo `create()` for a run stopped by bad input before it computed anything (no result line, no other
        file than study.yaml and the lock): the directory goes (its contents only, if it existed empty before),
        so the corrected command can use the same --out. Anything computed keeps the directory as it is."""
        if not D.is_main() or not self.study_path.exists():
            return
        ours = {self.study_path, self.lock_path}
        if any(p not in ours and not p.is_dir() for p in self.root.rglob("*")):
            return
        self.unlock()
        if self._made_root:
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            for p in self.root.iterdir():
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        p.unlink()

    def check_writable(self) -> None:
        """Prove an existing run directory is writable (before `--resume` trains anything)."""
        try:
            probe_writable(self.root)
        except OSError as exc:
            raise ConfigError(self._unwritable(exc)) from None

    def _unwritable(self, exc: OSError) -> str:
        return f"cannot write to the output directory {self.root}: {exc.strerror or exc}; choose another --out"

    # study.yaml
    def write_study(self, record: dict) -> None:
        if D.is_main():
            atomic_write_text(self.study_path, dump_yaml(json_safe(record)))

    def read_study(self) -> dict:
        if not self.root.exists():
            raise ConfigError(f"{self.root} does not exist: give the directory of an lmlab run (the one its "
                              "`report: DIR/report.md` line names)")
        if not self.study_path.exists():
            raise ConfigError(f"{self.root} has no study.yaml: it is not an lmlab run directory")
        try:
            data = parse_yaml(self.study_path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{self.study_path} is not valid YAML ({str(exc).splitlines()[0]})") from None
        missing = [k for k in STUDY_KEYS if k not in data] if isinstance(data, dict) else list(STUDY_KEYS)
        if missing:
            raise ConfigError(f"{self.study_path} is not an lmlab study file (no '{missing[0]}'); "
                              f"it is written by `lmlab run`")
        return data

    # results.jsonl
    def read_results(self) -> list[dict]:
        """The finished cells, each once: a cell recorded twice keeps its first row; the later ones are in
        `self.duplicates` (the report names them)."""
        self.duplicates = []
        if not self.results_path.exists():
            return []
        rows = []
        for lineno, line in enumerate(self.results_path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict) or any(k not in row for k in RESULT_KEYS):
                raise ConfigError(f"{self.results_path} line {lineno} is not a result line (a JSON object with "
                                  f"{', '.join(RESULT_KEYS)}); remove that line and resume to recompute its cell")
            rows.append(row)
        rows, self.duplicates = unique_results(rows)
        return rows

    @staticmethod
    def cells_text(rows: list[dict]) -> str:
        """'lora seed 42, rslora seed 42 and 3 more': the distinct cells of `rows`, the first ten named."""
        cells = sorted({f"{r['config']} seed {r['seed']}" for r in rows})
        return ", ".join(cells[:10]) + (f" and {len(cells) - 10} more" if len(cells) > 10 else "")

    def duplicates_note(self) -> str:
        """The report's line on the rows read_results() dropped."""
        shown = self.cells_text(self.duplicates)
        return (f"**{len(self.duplicates)} duplicate row(s) in `results.jsonl` were dropped** ({shown}): each cell "
                "counts once, with its first recorded row (two processes once ran this directory at the same time).")

    @staticmethod
    def count_cells(rows: list[dict], record: dict) -> int:
        """How many of the run's configuration x seed cells have a row (never more than there are cells)."""
        grid = {(c, s) for c in record["configurations"] for s in record["seeds"]}
        return len({(r["config"], r["seed"]) for r in rows if _hashable(r["config"], r["seed"])} & grid)

    def append_result(self, row: dict) -> None:
        """Add one finished cell (rewriting the file atomically, so it is never half-written)."""
        if not D.is_main():
            return
        text = self.results_path.read_text(encoding="utf-8") if self.results_path.exists() else ""
        if text and not text.endswith("\n"):
            text += "\n"
        atomic_write_text(self.results_path, text + json.dumps(json_safe(row), allow_nan=False) + "\n")

    def discard_cell(self, config: str, seed: int, keep_checkpoint: bool = False) -> None:
        """Remove a partial cell's directory - or, with `keep_checkpoint`, leave it as it is when it holds a
        complete training checkpoint (of its training, or of one of its stages in a folder inside TRAIN_STATE): the
        resumed cell continues from it (its training rewrites the files it appends to back to the checkpoint's
        state)."""
        if not D.is_main():
            return
        state = self.cell_dir(config, seed) / TRAIN_STATE
        # a cell that trains in stages checkpoints each in a folder of its own inside TRAIN_STATE
        stages = [state, *(p for p in state.iterdir() if p.is_dir())] if state.is_dir() else []
        if keep_checkpoint and any(complete_checkpoints(stage) for stage in stages):
            return
        shutil.rmtree(self.cell_dir(config, seed), ignore_errors=True)

    def drop_checkpoints(self, config: str, seed: int) -> None:
        """A recorded cell's training checkpoints (never needed again)."""
        if D.is_main():
            shutil.rmtree(self.cell_dir(config, seed) / TRAIN_STATE, ignore_errors=True)

    def write_json(self, relative: str, value) -> None:
        if D.is_main():
            atomic_write_text(self.root / relative, dumps(value) + "\n")
