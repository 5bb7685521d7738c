"""Shared test setup: a persistent cache for pretrained tiny models, and tiny saved models to test against.

The fixture models are trained for ~100 steps (a plain AdamW loop, not lmlab's) so that their
predictions are far from uniform: a wrong target or a wrong position then changes a loss by much more than
float noise, and greedy decoding has clear winners instead of near-ties.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]

# Set at import time, before any test imports lmlab, so cached tiny models are reused across runs and processes.
os.environ["LMLAB_CACHE"] = str(REPO / ".cache" / "test-models")

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # two xdist workers on two cores: one thread each
    os.environ["OMP_NUM_THREADS"] = "1"  # and so do the `lmlab` processes they start

VOCAB_SIZE = 384


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module's in-process work (requested with pytest.mark.usefixtures): on tiny
    models more intra-op threads only add synchronisation, seconds per step on a busy 2-core machine."""
    from lmlab.cpu_share import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture
def hub_offline(monkeypatch):
    """HF_HUB_OFFLINE=1, with lmlab's cached hub-reachability answer cleared before and after the test."""
    from lmlab.hub import hub_reachable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_reachable.cache_clear()
    yield
    hub_reachable.cache_clear()


def builtin_texts() -> list[str]:
    """Text from every built-in generator: grammar prose, long documents with facts, arithmetic problems."""
    from lmlab.data import generators

    rng = random.Random("conftest-texts")
    docs = generators.corpus_documents(0, 120, sentences_per_doc=20)
    docs += [generators.long_document(rng, 150, num_facts=3).text for _ in range(60)]
    docs += [f"Question: {it['question']}\nAnswer: {it['answer']}"
             for it in generators.arithmetic_problems("train", 120, seed=0)]
    return docs


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A byte-level BPE tokenizer (vocab 384, digits split) trained on built-in text."""
    from lmlab.data.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(builtin_texts(), VOCAB_SIZE)


def _train_briefly(model: torch.nn.Module, tokenizer, steps: int = 120, seq_len: int = 64, batch: int = 8) -> None:
    """A few AdamW steps of next-token prediction on packed built-in text (plain loop, independent of lmlab)."""
    stream: list[int] = []
    for ids in tokenizer(builtin_texts(), add_special_tokens=False)["input_ids"]:
        stream += [tokenizer.bos_token_id, *ids]
    blocks = torch.tensor(stream[: len(stream) // seq_len * seq_len]).view(-1, seq_len)  # [N, seq_len]
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(steps):
        ids = blocks[torch.randint(len(blocks), (batch,), generator=gen)]
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _save_tiny(arch: str, tokenizer, directory: Path) -> Path:
    from lmlab.models.tiny import TinyModelConfig, build_tiny

    cfg = TinyModelConfig(arch=arch, hidden_size=64, num_layers=2, num_heads=4, context=128)
    model = build_tiny(cfg, len(tokenizer), bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id,
                       pad_id=tokenizer.pad_token_id, seed=0)
    torch.manual_seed(0)
    _train_briefly(model, tokenizer)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, bpe_tokenizer) -> Path:
    """A save_pretrained directory: tiny Llama (2 layers, width 64, context 128) + its BPE tokenizer."""
    return _save_tiny("llama", bpe_tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, bpe_tokenizer) -> Path:
    """A save_pretrained directory: tiny GPT-2 (2 layers, width 64, context 128) + its BPE tokenizer."""
    return _save_tiny("gpt2", bpe_tokenizer, tmp_path_factory.mktemp("tiny-gpt2"))
