"""`lmlab ARGS...` that kills itself with SIGKILL at one chosen point of training (tests/test_resume.py).

LMLAB_TEST_KILL=POINT:N kills at the N-th time (counted over the whole process) the run reaches POINT:

- `step`: a step's gradients computed, its optimizer step not taken;
- `checkpoint`: a checkpoint's tensors written, its state.json not yet, its directory not renamed;
- `eval`: an evaluation computed (and any files it writes written), its result not yet recorded.

POINT:N:TERM sends SIGTERM (a graceful stop) instead of SIGKILL. Under torchrun only the process of rank 0 kills
itself (torchrun then stops the others).
"""

from __future__ import annotations

import os
import signal
import sys

from lmlab.engine import state as S
from lmlab.engine import train as T

point, _, at = os.environ.get("LMLAB_TEST_KILL", ":0").partition(":")
at, _, how = at.partition(":")  # POINT:N:TERM sends SIGTERM (a graceful stop) instead of SIGKILL
reached = {"count": 0}


def reach() -> None:
    reached["count"] += 1
    if reached["count"] == int(at) and os.environ.get("RANK", "0") == "0":
        os.kill(os.getpid(), signal.SIGTERM if how == "TERM" else signal.SIGKILL)


if point == "step":
    optimizer_step = T._optimizer_step

    def _optimizer_step(state, hooks, cfg):
        reach()
        return optimizer_step(state, hooks, cfg)

    T._optimizer_step = _optimizer_step
elif point == "checkpoint":
    save_file = S.save_file

    def _save_file(tensors, path, *args, **kwargs):
        save_file(tensors, path, *args, **kwargs)
        reach()

    S.save_file = _save_file
elif point == "eval":
    evaluate = T._evaluate

    def _evaluate(state, hooks, *args):
        original = hooks.evaluate

        def evaluate_then_die(s):
            result = original(s)
            reach()
            return result

        hooks.evaluate = evaluate_then_die
        try:
            return evaluate(state, hooks, *args)
        finally:
            del hooks.evaluate

    T._evaluate = _evaluate

if __name__ == "__main__":
    from lmlab.cli import main

    sys.exit(main(sys.argv[1:]))
