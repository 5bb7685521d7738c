"""Files, safely: text written atomically (a killed process never leaves half a file), and safetensors files
(adapters, MU checkpoints) read with one-line errors - never a pickle."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from lmlab.errors import CheckpointError


def parse_yaml(text: str):
    """`yaml.safe_load` on libyaml's parser where PyYAML was built with it (about 9x faster on a study.yaml; the same
    tree and error types), else the pure-Python one. For files lmlab writes: the pure-Python parser's messages are
    clearer (they name the character or alias at fault), so a user's own YAML goes through `yaml.safe_load`."""
    import yaml

    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506 - a safe loader


def dump_yaml(data) -> str:
    """`yaml.safe_dump(data, sort_keys=False)`, on libyaml's emitter where available (the same text)."""
    import yaml

    return yaml.dump(data, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False)


def cache_root() -> Path:
    """Where lmlab keeps what it builds once per machine (pretrained tiny models, compiled kernels):
    `LMLAB_CACHE`, by default ~/.cache/lmlab."""
    return Path(os.environ.get("LMLAB_CACHE", Path.home() / ".cache" / "lmlab"))


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, and put it back at once
    os.umask(mask)
    return mask


def probe_writable(directory: Path, *, make: bool = False) -> None:
    """Prove `directory` can take new files (made first when `make`) by writing and removing a probe file, before
    minutes of work are computed into it. Raises the OSError; each caller words it for its own option."""
    if make:
        directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".write-probe-{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` for the block to write a file to; synced and renamed over `path` when the
    block succeeds, removed when it fails - so `path` is always the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:  # mkstemp makes the file private (0600); the result gets the mode any new file gets (0666 less the umask)
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory, synced and renamed over it."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file at `path` (which the caller has checked exists), on the CPU.

    A truncated or garbled file, or a tensor that cannot be read, is a CheckpointError naming the file.
    """
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types for truncated or garbled files
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); "
                              "it may be truncated or corrupt") from None
    tensors = {}
    with handle:
        for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
            try:
                tensors[key] = handle.get_tensor(key)
            except Exception as exc:
                raise CheckpointError(f"{path}: tensor '{key}' cannot be read ({exc})") from None
    return tensors
