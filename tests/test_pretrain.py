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
    monkeypatch.setenv("LMLAB_CACHE", str(cache))
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
    assert info["cpu_capability"] == "DEFAULT" and info["mkl_cbwr"] == "COMPATIBLE"
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
    else:  # the reference: without the pin the two machines build different bases
        assert not _same(*weights)
