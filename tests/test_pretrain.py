"""Built-in tiny bases are the same on every machine: neither the thread count of the process that asks for one
(which lmlab lowers on a loaded machine, and which differs from machine to machine) nor the vector instructions of
its CPU (AVX-512 here, AVX2 elsewhere) may change a single weight."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmlab.cpu_share import torch_threads
from lmlab.engine.hooks import Display
from lmlab.engine.train import TrainConfig
from lmlab.models.tiny import TinyModelConfig
from lmlab.studies import pretrain
from lmlab.studies.pretrain import PretrainConfig, pretrained_tiny

SMALL = PretrainConfig(name="threads-test", model=TinyModelConfig(hidden_size=128, num_layers=1, num_heads=4,
                                                                  context=64),
                       data="corpus", num_docs=120, vocab_size=320,
                       train=TrainConfig(max_steps=30, batch_size=16, lr=3e-3, warmup_ratio=0.05))


def _build(cache: Path, threads: int, monkeypatch) -> tuple[dict, dict]:
    """The base as a process on `threads` threads asks for it (torch's and the OpenMP/MKL variables a child would
    inherit)."""
    monkeypatch.setenv("LMLAB_CACHE", str(cache))
    monkeypatch.setenv("OMP_NUM_THREADS", str(threads))
    monkeypatch.setenv("MKL_NUM_THREADS", str(threads))
    with torch_threads(threads):
        path = pretrained_tiny(SMALL, display=Display(progress=False))
        assert torch.get_num_threads() == threads  # the caller's thread count is left as it was
    return load_file(path / "model.safetensors"), json.loads((path / "lmlab_pretrain.json").read_text())


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_base_pretrained_on_two_threads_is_the_base_pretrained_on_one(tmp_path: Path, monkeypatch):
    one, info = _build(tmp_path / "one", 1, monkeypatch)
    two, _ = _build(tmp_path / "two", 2, monkeypatch)
    assert _same(one, two)
    assert info["device"] == "cpu" and info["threads"] == 1 and info["versions"]["torch"] == torch.__version__
    assert info["cpu_capability"] == "DEFAULT"  # what PyTorch reports using, not only what was asked
    assert info["mkl_cbwr_requested"] == "COMPATIBLE" and info["mkl"] == torch.backends.mkl.is_available()
    assert info["lmlab_cpu_kernels"] is False  # compiled with -march=native: another CPU would add up differently


def test_without_one_thread_the_base_would_depend_on_the_thread_count(tmp_path: Path):
    """The reference: what the pin guards against happens without it (the recipe run here, on 1 and 2 threads)."""
    weights = []
    for threads in (1, 2):
        with torch_threads(threads):
            pretrain._pretrain_into(SMALL, tmp_path / str(threads), Display(progress=False))
        weights.append(load_file(tmp_path / str(threads) / "model.safetensors"))
    if _same(*weights):
        pytest.skip("on this machine 1 and 2 threads round this model's sums alike: the pinned check cannot fail here")


CAPABILITIES = ("AVX512", "AVX2")  # what PyTorch picks on this machine's CPU, and one an older x86 CPU would pick


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "unpinned-reference"])
def test_a_base_pretrained_where_the_cpu_has_avx512_is_the_base_pretrained_on_avx2(pinned, tmp_path: Path, monkeypatch):
    """ATEN_CPU_CAPABILITY in the asking process's environment stands for another CPU (PyTorch uses no more than it
    names); MKL_CBWR=AVX2 for MKL's choice on it. The pretraining process replaces both with its own."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("this CPU has no AVX-512: it cannot stand for both kinds of machine")
    if not pinned:
        monkeypatch.setattr(pretrain, "PINNED_NUMERICS", {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    weights = []
    for capability in CAPABILITIES:
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", capability.lower())
        monkeypatch.setenv("MKL_CBWR", "AVX2" if capability == "AVX2" else "AUTO")
        monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / capability))
        path = pretrained_tiny(SMALL, display=Display(progress=False))
        info = json.loads((path / "lmlab_pretrain.json").read_text())
        assert info["cpu_capability"] == ("DEFAULT" if pinned else capability)
        weights.append(load_file(path / "model.safetensors"))
    if pinned:
        assert _same(*weights)
    elif _same(*weights):  # the reference: without the pin the two machines' settings build different bases
        pytest.skip("here AVX-512 and AVX2 kernels round this model's sums alike: the pinned check cannot fail")


# sha256 over (name, bytes) of every tensor of the SMALL base, sorted by name, per torch build: the base another
# x86-64 machine must build too (the tests above vary the settings on one CPU; this compares with the CPU that
# recorded it - an AMD EPYC with AVX-512). Add a line for a new torch build from a machine where the tests above pass.
PINNED_DIGESTS = {
    "2.13.0+cpu": "85c2f2d345821d3caf6e683cb206dceef8de13fce4e011fd4dcdc3272aff996f",
}


def test_the_small_base_is_the_one_recorded_for_this_torch_build(tmp_path: Path, monkeypatch):
    import hashlib
    import platform

    if platform.machine() != "x86_64" or torch.__version__ not in PINNED_DIGESTS:
        pytest.skip(f"no digest recorded for torch {torch.__version__} on {platform.machine()}")
    weights, _ = _build(tmp_path, 1, monkeypatch)
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].contiguous().numpy().tobytes())
    assert digest.hexdigest() == PINNED_DIGESTS[torch.__version__]


STOPPABLE = """
import sys
from lmlab.engine.hooks import Display
from lmlab.engine.train import TrainConfig
from lmlab.studies.pretrain import PretrainConfig, pretrained_tiny
from lmlab.models.tiny import TinyModelConfig
cfg = PretrainConfig(name="stop-test", model=TinyModelConfig(hidden_size=64, num_layers=1, num_heads=2, context=64),
                     data="corpus", num_docs=200, vocab_size=300,
                     train=TrainConfig(max_steps=100000, epochs=1000, batch_size=8, lr=1e-3))
try:
    pretrained_tiny(cfg, display=Display(progress=False))
except KeyboardInterrupt:
    sys.exit(130)
"""


@pytest.mark.parametrize("how", ["sigterm-to-lmlab", "ctrl-c"])
def test_the_pretraining_process_stops_with_the_run(how, tmp_path: Path):
    """Stopping lmlab while a base is being built stops the process building it too - at once, quietly, and without
    a half-written base: SIGTERM to lmlab alone (the kernel tells the child: PR_SET_PDEATHSIG), or Ctrl-C (SIGINT to
    the terminal's process group: both see it)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    def as_from_a_terminal():  # Ctrl-C's default action, unblocked, whatever an earlier test left in this process
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})

    inherited = (signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, []))
    env = {**os.environ, "LMLAB_CACHE": str(tmp_path)}
    run = subprocess.Popen([sys.executable, "-c", STOPPABLE], env=env, stderr=subprocess.PIPE, text=True,
                           start_new_session=True, preexec_fn=as_from_a_terminal)
    try:
        assert "pretraining tiny base 'stop-test'" in run.stderr.readline()  # the child runs the recipe
        time.sleep(1.0)
        children = psutil.Process(run.pid).children()
        assert len(children) == 1
        if how == "ctrl-c":
            os.killpg(run.pid, signal.SIGINT)
        else:
            run.send_signal(signal.SIGTERM)
        try:
            run.wait(timeout=60)
        except subprocess.TimeoutExpired:  # say which process still ran, and what they wrote, before stopping them
            still = [f"{p.pid} ({'lmlab' if p.pid == run.pid else 'pretraining'}: {p.status()})"
                     for p in [psutil.Process(run.pid), *children] if p.is_running()]
            os.killpg(run.pid, signal.SIGKILL)
            pytest.fail(f"still running 60 s after {how}: {', '.join(still)} (this process's SIGINT handler and "
                        f"blocked signals: {inherited}); stderr: {run.stderr.read()[-3000:]}")
        _, alive = psutil.wait_procs(children, timeout=60)
        assert not alive
        errors = run.stderr.read()  # both processes' stderr (the child inherits lmlab's)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert "Traceback" not in errors, errors
    models = tmp_path / "models"
    assert not [p for p in models.iterdir() if not p.name.endswith(".lock")], list(models.iterdir())
