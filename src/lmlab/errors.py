"""Errors that mean "the user gave us something wrong".

The CLI turns any `LmlabError` into one line on stderr and exit code 2 (no traceback); every other
exception is a bug or an environment failure and exits 1. Messages name what is wrong and how to fix it.
"""


class LmlabError(Exception):
    """Bad usage, bad config or bad input. `str(error)` is the one line shown to the user."""


class ConfigError(LmlabError):
    """A config value, key, preset or override is invalid."""


class DataError(LmlabError):
    """A data file or data set is missing, empty or malformed, or unreachable while offline."""


class CheckpointError(LmlabError):
    """A model, adapter or checkpoint cannot be loaded (missing, corrupt, wrong shape or architecture)."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is running out of memory: torch's OutOfMemoryError (CUDA's allocator), Python's MemoryError, or
    a RuntimeError that says so (the CPU allocator; cuBLAS failing to allocate its workspace)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        words in text for words in ("out of memory", "can't allocate memory", "alloc_failed"))
