"""The one run-directory writer (PROTOCOL.md section 6).

```
<run>/study.yaml      resolved configuration (+ lmlab and library versions)
<run>/results.jsonl   one line per finished cell
<run>/cells/<config>/seed-<s>/   config.json, metrics.jsonl, eval_samples.jsonl, artifacts
<run>/summary.json report.md report.tex results.csv plots/*.png
```
Every write is atomic (temporary file + rename): a killed run never leaves a half-written file.
Only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import tempfile
from pathlib import Path

import yaml

from lmlab.engine import distributed as D
from lmlab.errors import ConfigError


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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


class RunDir:
    def __init__(self, root: Path):
        self.root = Path(root)

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
    def create(self) -> None:
        """Make the directory and prove it is writable, before any training starts."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-probe-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"cannot write to the output directory {self.root}: {exc.strerror or exc}; "
                              f"choose another --out") from None

    def is_fresh(self) -> bool:
        return not self.root.exists() or not any(self.root.iterdir())

    # study.yaml
    def write_study(self, record: dict) -> None:
        if D.is_main():
            atomic_write_text(self.study_path, yaml.safe_dump(json_safe(record), sort_keys=False))

    def read_study(self) -> dict:
        if not self.study_path.exists():
            raise ConfigError(f"{self.root} has no study.yaml: it is not an lmlab run directory")
        try:
            data = yaml.safe_load(self.study_path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{self.study_path} is not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict) or "study" not in data:
            raise ConfigError(f"{self.study_path} is not an lmlab study file")
        return data

    # results.jsonl
    def read_results(self) -> list[dict]:
        if not self.results_path.exists():
            return []
        rows = []
        for lineno, line in enumerate(self.results_path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ConfigError(f"{self.results_path} line {lineno} is not valid JSON; "
                                  f"remove that line and resume to recompute its cell") from None
        return rows

    def append_result(self, row: dict) -> None:
        """Add one finished cell (rewriting the file atomically, so it is never half-written)."""
        if not D.is_main():
            return
        text = self.results_path.read_text(encoding="utf-8") if self.results_path.exists() else ""
        if text and not text.endswith("\n"):
            text += "\n"
        atomic_write_text(self.results_path, text + json.dumps(json_safe(row), allow_nan=False) + "\n")

    def discard_cell(self, config: str, seed: int) -> None:
        if D.is_main():
            shutil.rmtree(self.cell_dir(config, seed), ignore_errors=True)

    def write_json(self, relative: str, value) -> None:
        if D.is_main():
            atomic_write_text(self.root / relative, dumps(value) + "\n")
