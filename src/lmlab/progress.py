"""Progress bars for the work between training steps that can take seconds: evaluation, generation, building data.

Off by default (library calls and tests print nothing); `lmlab run` turns them on for its run unless `--quiet`.
A bar shows only on rank 0, on stderr, and only once its work has taken more than `DELAY` seconds, so quick
evaluations stay silent. Training has its own bar (`lmlab.engine.train`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator

from tqdm.auto import tqdm

DELAY = 3.0  # seconds of work before a bar appears
_enabled = False


@contextlib.contextmanager
def enabled(on: bool = True) -> Iterator[None]:
    """Bars on (or off) for the block."""
    global _enabled
    previous, _enabled = _enabled, on
    try:
        yield
    finally:
        _enabled = previous


def is_enabled() -> bool:
    from lmlab.engine import distributed as D

    return _enabled and D.is_main()


def bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it") -> tqdm:
    """A tqdm bar (an iterable wrapper, or `update()` it yourself) that shows only when bars are on and the work
    has run for `DELAY` seconds; it clears itself when done."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, delay=DELAY, leave=False, dynamic_ncols=True,
                disable=not is_enabled())


def quiet_libraries() -> None:
    """Our progress bars and lines only: no per-load progress bars or advisory warnings from libraries."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
