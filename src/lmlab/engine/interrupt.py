"""Stopping training cleanly on SIGTERM / SIGINT: while the loop runs, the process's signal handler asks it to
stop (`STOP.request`) instead of raising at once; the loop finishes its step (all processes agree on the step:
the request travels with the step's all-reduce), writes a checkpoint and raises `TrainingInterrupted`. A second
signal, or one outside the loop, is the handler's to act on (`request` returns False)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped at a step boundary after a signal, its state checkpointed."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopRequest:
    def __init__(self):
        self.depth = 0
        self.signum: int | None = None

    @contextlib.contextmanager
    def watch(self) -> Iterator[StopRequest]:
        """While the block runs, signals are requests to stop at the next step boundary."""
        self.depth += 1
        try:
            yield self
        finally:
            self.depth -= 1
            if not self.depth:
                self.signum = None

    def request(self, signum: int) -> bool:
        """True when a running loop takes the request; False for a second signal or outside the loop."""
        if self.depth and self.signum is None:
            self.signum = signum
            return True
        return False

    @property
    def requested(self) -> bool:
        return self.signum is not None


STOP = StopRequest()


def in_finalizer(frame: FrameType | None) -> bool:
    """Whether the interrupted code runs inside an object's `__del__` (e.g. a progress bar's), where Python prints
    an exception raised by a signal handler as "Exception ignored ... Traceback" and drops it."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def deliver_later(signum: int, delay_s: float = 0.05) -> None:
    """Send `signum` to this process again shortly (from a timer thread), for a handler that must not raise now."""
    timer = threading.Timer(delay_s, os.kill, (os.getpid(), signum))
    timer.daemon = True
    timer.start()
