"""One cell of a study, computed in whichever process runs it (the study's own process, a worker of `--parallel`, a
submitit job): train and evaluate it in its directory and return its `results.jsonl` row."""

from __future__ import annotations

import dataclasses
import signal
import sys
import time
import traceback

from lmlab.engine import distributed as D
from lmlab.engine.hooks import Display
from lmlab.engine.train import NonFiniteLoss
from lmlab.errors import LmlabError
from lmlab.studies.rundir import RunDir
from lmlab.tracking import cell_tracker


class StudyInterrupted(KeyboardInterrupt):
    """SIGTERM/SIGINT during a run (a KeyboardInterrupt, so no `except Exception` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def log_line(message: str) -> None:
    """A progress line on stderr (rank 0 only)."""
    if D.is_main():
        print(message, file=sys.stderr, flush=True)


def compute_row(study, ctx, run: RunDir, config: str, seed: int, display: Display) -> dict:
    """Train and evaluate one cell in its own directory; a failure becomes a `failed` row."""
    cell_dir = run.cell_dir(config, seed)
    # a partial cell left by an interrupted run: kept when training can continue from its checkpoint
    run.discard_cell(config, seed, keep_checkpoint=True)
    if D.is_main():
        cell_dir.mkdir(parents=True, exist_ok=True)
        run.write_json(str(cell_dir.relative_to(run.root) / "config.json"),
                       {"config": config, "seed": seed, "study": study.name})
    D.barrier()
    started = time.perf_counter()
    row = {"config": config, "seed": seed, "status": "ok", "metrics": {}, "error": None}
    kinds = display.trackers if D.is_main() else ()
    params = run.read_study()["config"] if kinds else {}
    with cell_tracker(kinds, run.root, study.name, config, seed, params) as tracker:
        shown = display.named(f"{config} seed {seed}")
        if tracker is not None:
            shown = dataclasses.replace(shown, record=tracker.record)
        try:
            output = study.run_cell(ctx, config, seed, cell_dir, shown)
            row.update(metrics=output.metrics, details=output.details, params=output.params)
        except LmlabError:  # bad input stops the study (every cell would fail the same way)
            raise
        except NonFiniteLoss as exc:
            row.update(status="failed", error=str(exc),
                       details={"failed_step": exc.step, "failed_loss": str(exc.value)})
        except Exception as exc:  # a failed cell is recorded; the study goes on
            row.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            if D.is_main():
                (cell_dir / "error.txt").write_text(traceback.format_exc(), encoding="utf-8")
        row["time_s"] = time.perf_counter() - started
        if tracker is not None:
            tracker.finish(row)
    return row
