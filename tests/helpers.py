"""What several test modules share: running the `lmlab` command in a subprocess, reading JSON lines, and the
float64 attention reference the kernel tests compare against."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from lmlab.engine.hooks import Hooks

LMLAB = [sys.executable, "-m", "lmlab.cli"]
# One thread: on cores shared with other jobs, two OpenMP threads spin-wait for each other on tiny models. On the CPU
# also on a machine with a GPU: the commands' results are compared with CPU references and with each other (bitwise
# after a resume), and several processes share no GPU (gloo).
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "LMLAB_DEVICE": "cpu"}


# Optional extras (lm-eval, trackers, submitit) are installed by `make setup`, and their tests run and must pass. A
# bare image that lacks them (the GPU check, scripts/gpu_check.sh) sets this to skip those tests instead of failing.
SKIP_MISSING_EXTRAS = "LMLAB_TEST_SKIP_MISSING_EXTRAS"


def require_extras(*modules: str) -> None:
    """Skip the calling test where an optional package it needs is missing and SKIP_MISSING_EXTRAS is set; otherwise
    let it run (and fail where the package is missing: `make test` installs every extra)."""
    import importlib.util

    import pytest

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing and os.environ.get(SKIP_MISSING_EXTRAS) == "1":
        pytest.skip(f"optional packages not installed: {', '.join(missing)} ({SKIP_MISSING_EXTRAS}=1)")


def run_cli(*args: str, timeout: float = 900, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """`lmlab ARGS...` in a fresh process, output captured."""
    return subprocess.run([*LMLAB, *args], capture_output=True, text=True, timeout=timeout,
                          env=ONE_THREAD if env is None else env, **kwargs)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def save_tiny_model(directory: Path, arch: str = "llama", *, texts: list[str], vocab_size: int = 300, seed: int = 0,
                    hidden_size: int = 64, context: int = 64, **sizes) -> Path:
    """An untrained 2-layer model and a BPE tokenizer trained on `texts`, written with save_pretrained (what
    users pass as a model directory)."""
    from lmlab.data.tokenizer import train_bpe_tokenizer
    from lmlab.models.tiny import TinyModelConfig, build_tiny

    tokenizer = train_bpe_tokenizer(texts, vocab_size)
    cfg = TinyModelConfig(arch=arch, hidden_size=hidden_size, num_layers=2, num_heads=4, context=context, **sizes)
    model = build_tiny(cfg, len(tokenizer), bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id,
                       pad_id=tokenizer.pad_token_id, seed=seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def run_smoke_study(directory: Path, study: str) -> Path:
    """`lmlab run STUDY --preset smoke` into directory/run; checks it succeeded and printed its report."""
    out = Path(directory) / "run"
    proc = run_cli("run", study, "--preset", "smoke", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert f"report: {out / 'report.md'}" in proc.stdout
    return out


def assert_run_layout(run: Path, plots: list[str]) -> None:
    """The run directory of the contract: study, results, summary, reports and the named (non-empty) plots."""
    for name in ("study.yaml", "results.jsonl", "summary.json", "report.md", "report.tex", "results.csv"):
        assert (run / name).is_file(), name
    for plot in plots:
        assert (run / "plots" / plot).stat().st_size > 1000, plot


def causal_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax attention in float64, one query head at a time: q [B, H, T, D], k, v [B, Hkv, T, D] ->
    [B, T, H, D]; query head h reads key/value head h // (H / Hkv)."""
    B, H, T, _ = q.shape
    group = H // k.shape[1]
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    heads = []
    for h in range(H):
        scores = (q[:, h].double() @ k[:, h // group].double().transpose(1, 2)) * scale
        heads.append(torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v[:, h // group].double())
    return torch.stack(heads, dim=2)


def value_and_grads(fn, tensors, grad_out: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """fn(*tensors) in float64 and the gradients of sum(fn(...) * grad_out) with respect to each of `tensors`."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    (out * grad_out.to(out.dtype)).sum().backward()
    return out.detach().double(), [t.grad.double() for t in leaves]


def warnings_without_compiler(script: str, cache: Path) -> list[tuple[str, str]]:
    """Run `script` in a fresh process with no C compiler (CC pointing nowhere) and an empty lmlab cache `cache`;
    the script records warnings into `caught` and this returns them as (category, message) pairs, which it prints
    as JSON on its last line."""
    env = {"LMLAB_CACHE": str(cache), "CC": str(cache / "no-such-cc"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    script += "\nimport json\nprint(json.dumps([(w.category.__name__, str(w.message)) for w in caught]))\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return [tuple(pair) for pair in json.loads(result.stdout.strip().splitlines()[-1])]


class Callbacks(Hooks):
    """Hooks made of plain functions, for tests: loss(model, batch), collate(examples), evaluate(model),
    before_step(step, model) (the after-backward hook, 0-based step), aux(model), rules."""

    def __init__(self, loss=None, collate=None, evaluate=None, before_step=None, aux=None, rules=(),
                 select="val_loss", higher_is_better=False, restore_best=None):
        self._loss, self._collate, self._evaluate = loss, collate, evaluate
        self._before_step, self._aux, self._rules = before_step, aux, rules
        self.select, self.higher_is_better, self.restore_best = select, higher_is_better, restore_best

    @property
    def evaluates(self) -> bool:
        return self._evaluate is not None

    def param_rules(self):
        return self._rules

    def collate(self, examples):
        return self._collate(examples) if self._collate else super().collate(examples)

    def loss(self, state, model, batch):
        return self._loss(model, batch) if self._loss else super().loss(state, model, batch)

    def aux_loss(self, state):
        return self._aux(state.model) if self._aux else None

    def after_backward(self, state):
        if self._before_step:
            self._before_step(state.step, state.model)

    def evaluate(self, state):
        return self._evaluate(state.model)


VOLATILE = ("time", "mem", "per_s")  # wall-clock metrics differ between runs; everything else must not


def comparable_summary(summary: dict) -> dict:
    """The summary without wall-clock metrics (they differ run to run by nature)."""
    out = json.loads(json.dumps(summary))
    for entry in out["configs"].values():
        for section in ("metrics", "vs_reference"):
            for key in list(entry[section]):
                if any(v in key for v in VOLATILE):
                    del entry[section][key]
    return out


def assert_close(actual, expected, path: str = "", rel: float = 1e-5) -> None:
    """Nested summaries equal, floats within `rel`: a cell recomputed in another process may differ in the last
    digits (the CPU kernels' OpenMP reductions split work by the threads they get on a busy machine)."""
    import pytest

    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), path
        for key in expected:
            assert_close(actual[key], expected[key], f"{path}/{key}", rel)
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_close(a, e, f"{path}[{i}]", rel)
    elif isinstance(expected, float) and not isinstance(expected, bool):
        assert actual == pytest.approx(expected, rel=rel, abs=1e-6), f"{path}: {actual!r} vs {expected!r}"
    else:
        assert actual == expected, path
