"""Model loading (local directories, safetensors only, readable errors, offline hub ids) and cached tiny bases."""

from __future__ import annotations

import json
import time

import pytest
import torch
from transformers import AutoTokenizer

from lmlab.config import build
from lmlab.engine.hooks import Display
from lmlab.engine.train import TrainConfig
from lmlab.errors import CheckpointError, ConfigError
from lmlab.fileio import cache_root
from lmlab.models.hf import context_length, load_causal_lm, load_tokenizer, prefix_token_id
from lmlab.models.tiny import TinyModelConfig, build_tiny
from lmlab.studies.pretrain import PretrainConfig, pretrained_tiny


def fresh_model(arch: str, vocab: int = 120):
    cfg = TinyModelConfig(arch=arch, hidden_size=64, num_layers=2, num_heads=4, context=64)
    return build_tiny(cfg, vocab, bos_id=1, eos_id=2, pad_id=0, seed=3).eval()


def message_of(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loaded_model_gives_the_original_logits(arch, tmp_path):
    model = fresh_model(arch)
    model.save_pretrained(tmp_path)
    assert list(tmp_path.glob("*.safetensors"))
    loaded = load_causal_lm(str(tmp_path))
    assert not loaded.training and type(loaded) is type(model)
    ids = torch.randint(3, 120, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert context_length(loaded.config) == 64


def test_dtype_and_config_fn_apply_before_the_model_is_built(tmp_path):
    fresh_model("llama").save_pretrained(tmp_path)

    def longer(config):
        config.max_position_embeddings = 256
        return config

    loaded = load_causal_lm(str(tmp_path), dtype="bfloat16", config_fn=longer)
    assert loaded.config.max_position_embeddings == 256
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    with pytest.raises(CheckpointError, match="dtype 'int8'"):
        load_causal_lm(str(tmp_path), dtype="int8")


def test_tokenizer_loads_from_the_model_directory(tiny_llama_dir, bpe_tokenizer):
    tok = load_tokenizer(str(tiny_llama_dir))
    text = "remember that the room of LYRA is 4821 ."
    assert tok.encode(text, add_special_tokens=False) == bpe_tokenizer.encode(text, add_special_tokens=False)
    assert prefix_token_id(tok) == bpe_tokenizer.bos_token_id
    assert tok.pad_token_id == bpe_tokenizer.pad_token_id


def test_tokenizer_without_pad_gets_eos_as_pad_and_eos_serves_as_prefix(tiny_llama_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.pad_token = None
    tok.bos_token = None
    tok.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    for weights in tiny_llama_dir.glob("*.safetensors"):
        (tmp_path / weights.name).write_bytes(weights.read_bytes())
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token_id == loaded.eos_token_id == tok.eos_token_id
    assert prefix_token_id(loaded) == tok.eos_token_id


def test_directory_without_weights_is_a_checkpoint_error(tmp_path):
    fresh_model("llama").config.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_causal_lm(str(tmp_path))
    message = message_of(info)
    assert str(tmp_path) in message and "no model weights" in message


def test_pickle_only_weights_are_refused(tmp_path):
    model = fresh_model("gpt2")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as info:
        load_causal_lm(str(tmp_path))
    message = message_of(info)
    assert "pytorch_model.bin" in message and "safetensors" in message


def test_missing_directory_file_path_and_missing_config_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_causal_lm(str(tmp_path / "nowhere"))
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file"):
        load_causal_lm(str(tmp_path / "weights.safetensors"))
    with pytest.raises(CheckpointError, match="no config.json"):
        load_causal_lm(str(tmp_path))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nowhere"))


def test_truncated_safetensors_is_a_readable_checkpoint_error(tmp_path):
    fresh_model("llama").save_pretrained(tmp_path)
    weights = next(tmp_path.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as info:
        load_causal_lm(str(tmp_path))
    assert "cannot load model weights" in message_of(info)


def test_uncached_hub_id_while_offline_fails_fast(hub_offline):
    started = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        load_causal_lm("lmlab-tests/not-a-cached-model")
    with pytest.raises(CheckpointError) as tok_info:
        load_tokenizer("lmlab-tests/not-a-cached-model")
    elapsed = time.perf_counter() - started
    assert elapsed < 15
    for error in (info, tok_info):
        message = message_of(error)
        assert "'lmlab-tests/not-a-cached-model'" in message and "offline" in message
        assert "save_pretrained" in message  # names the offline alternative


def small_pretrain_config(**changes) -> PretrainConfig:
    base = dict(
        name="tiny-test", data="corpus", num_docs=12, vocab_size=300,
        model=TinyModelConfig(hidden_size=64, num_layers=2, num_heads=4, context=32),
        train=TrainConfig(max_steps=2, batch_size=4, lr=1e-3),
    )
    return PretrainConfig(**{**base, **changes})


def test_pretrained_tiny_is_cached_by_config_hash(tmp_path, monkeypatch):
    # A private cache, so the first call is guaranteed to train and the second to reuse.
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path))
    cfg = small_pretrain_config()
    logs: list[str] = []
    path = pretrained_tiny(cfg, display=Display(progress=False, log=logs.append))
    assert path.parent == cache_root() / "models" == tmp_path / "models"
    assert path.name == f"tiny-test-llama-{cfg.key()}"
    assert any("pretraining" in line for line in logs)
    info = json.loads((path / "lmlab_pretrain.json").read_text())
    assert info["key"] == cfg.key() and info["steps"] == 2 and info["val_ppl"] > 1
    stamps = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    assert any(name.endswith(".safetensors") for name in stamps) and "tokenizer.json" in stamps

    again_logs: list[str] = []
    assert pretrained_tiny(cfg, display=Display(progress=False, log=again_logs.append)) == path
    assert again_logs == []
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == stamps
    assert sorted(p.name for p in (tmp_path / "models").iterdir() if p.is_dir()) == [path.name]  # no staging left

    model, tok = load_causal_lm(str(path)), load_tokenizer(str(path))
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert model.config.vocab_size == len(tok) <= 300 and model.config.bos_token_id == tok.bos_token_id


def test_pretrain_key_depends_on_every_setting():
    cfg = small_pretrain_config()
    assert small_pretrain_config().key() == cfg.key()  # stable for the same settings
    variants = [
        small_pretrain_config(num_docs=13),
        small_pretrain_config(data_seed=1),
        small_pretrain_config(model=TinyModelConfig(hidden_size=64, num_layers=2, num_heads=4, context=64)),
        small_pretrain_config(model=TinyModelConfig(arch="gpt2", hidden_size=64, num_heads=4, context=32)),
        small_pretrain_config(train=TrainConfig(max_steps=3, batch_size=4, lr=1e-3)),
    ]
    keys = {v.key() for v in variants}
    assert cfg.key() not in keys and len(keys) == len(variants)


def test_vocab_size_the_byte_level_tokenizer_cannot_honour_is_rejected():
    with pytest.raises(ConfigError, match="vocab_size"):
        build(PretrainConfig, {"vocab_size": 128})
