"""Saving and loading HyLoRADA adapters, every bad input the loader must name, config validation, and
context extension of the base (RoPE scaling, GPT-2 position-table interpolation)."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from lmlab.config import build
from lmlab.errors import CheckpointError, ConfigError
from lmlab.hylorada import (
    HyLoRADAConfig,
    apply_hylorada,
    interpolate_position_embeddings,
    load_adapter,
    rope_scaling,
    save_adapter,
)
from lmlab.hylorada.model import adapter_parameters
from test_hylorada_model import BUILDERS, CONTEXT, hy_config, lm_logits, perturb, tiny_gpt2, tiny_llama, token_batch


def full_model(arch: str = "gpt2"):
    """Every part on: DoRA, position bias, learnable buckets, trained embeddings and norms, all off their init."""
    config = hy_config(use_dora=True, landmarks="learnable_bucket", train_embeddings=True, train_norms=True,
                       max_positions=48)
    model = apply_hylorada(BUILDERS[arch](), config)
    perturb(model)
    return model


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_save_then_load_reproduces_logits_and_every_tensor(arch, tmp_path):
    model = full_model(arch)
    info = save_adapter(model, tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    expected = {n: p.detach() for n, p in adapter_parameters(model).items()}
    assert set(weights) == set(expected)
    for part in ("buckets.boundaries", "position_bias.table", "lora_magnitude", "embed", "norm"):
        assert any(part in n or part == "embed" and "wte" in n or part == "norm" and "ln_" in n for n in weights)
    assert info["num_tensors"] == len(expected)
    assert info["num_params"] == sum(t.numel() for t in expected.values())
    assert info["weights_bytes"] == (tmp_path / "adapter_model.safetensors").stat().st_size
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["format_version"] == 1 and meta["base_model"]["model_type"] == arch and meta["max_positions"] == 48

    loaded = load_adapter(BUILDERS[arch](), tmp_path)
    ids = token_batch()
    assert torch.equal(lm_logits(loaded, ids), lm_logits(model, ids))
    for name, param in adapter_parameters(loaded).items():
        assert torch.equal(param.detach(), expected[name]) and param.requires_grad


def test_an_interrupted_save_keeps_the_previous_adapter_whole(tmp_path, monkeypatch):
    import lmlab.hylorada.io as io

    first = full_model("gpt2")
    save_adapter(first, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def fail_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "save_file", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(full_model("gpt2"), tmp_path)
    # the old weights and config are untouched and no temporary file is left behind
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    loaded = load_adapter(tiny_gpt2(), tmp_path)
    ids = token_batch()
    assert torch.equal(lm_logits(loaded, ids), lm_logits(first, ids))


def test_max_positions_resolution():
    model = apply_hylorada(tiny_llama(), hy_config())
    assert model.hylorada.max_positions == CONTEXT  # the model's own context
    model = apply_hylorada(tiny_llama(), hy_config(), max_positions=32)
    assert model.hylorada.max_positions == 32  # the run's max_length
    model = apply_hylorada(tiny_llama(), hy_config(max_positions=40), max_positions=32)
    assert model.hylorada.max_positions == 40  # explicit config wins


# ---------------------------------------------------------------------------------------------------
# Bad input


def test_target_list_matching_nothing_is_a_config_error_listing_names():
    with pytest.raises(ConfigError, match=r"\['q_proj'\] match no Linear/Conv1D module of GPT2LMHeadModel.*c_attn"):
        apply_hylorada(tiny_gpt2(), hy_config(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="not Linear/Conv1D"):
        apply_hylorada(tiny_gpt2(), hy_config(target_modules=["attn"]))


def test_adapter_for_another_architecture_is_refused(tmp_path):
    save_adapter(full_model("gpt2"), tmp_path)
    with pytest.raises(CheckpointError, match="adapter for a 'gpt2' model.*'llama'"):
        load_adapter(tiny_llama(), tmp_path)


def test_adapter_for_another_size_names_the_tensor_and_leaves_the_model_untouched(tmp_path):
    save_adapter(full_model("gpt2"), tmp_path)
    wider = tiny_gpt2(n_embd=32)
    before = {n: p.clone() for n, p in wider.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"tensor '.+' has shape \[.+\] but the model needs"):
        load_adapter(wider, tmp_path)
    assert not hasattr(wider, "hylorada")
    assert all(torch.equal(p, before[n]) for n, p in wider.state_dict().items())
    fewer_layers = tiny_gpt2(n_layer=1)
    with pytest.raises(CheckpointError, match=r"tensor 'transformer\.h\.1\..+' has no place in this model"):
        load_adapter(fewer_layers, tmp_path)


def test_newer_format_version_is_refused(tmp_path):
    save_adapter(full_model(), tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    meta["format_version"] = 2
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format_version 2, newer than this lmlab reads"):
        load_adapter(tiny_gpt2(), tmp_path)


def test_truncated_or_garbled_safetensors_is_refused_naming_the_file(tmp_path):
    save_adapter(full_model(), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors.*(not a readable safetensors|cannot be)"):
        load_adapter(tiny_gpt2(), tmp_path)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors"):
        load_adapter(tiny_gpt2(), tmp_path)


def test_missing_files_and_bad_json_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="adapter_config.json does not exist"):
        load_adapter(tiny_gpt2(), tmp_path)
    save_adapter(full_model(), tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="adapter_model.safetensors does not exist"):
        load_adapter(tiny_gpt2(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_adapter(tiny_gpt2(), tmp_path)


def test_peft_features_we_cannot_hold_are_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": {"q_proj": 8}}))
    with pytest.raises(CheckpointError, match="rank_pattern"):
        load_adapter(tiny_llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(CheckpointError, match="'IA3' is not supported"):
        load_adapter(tiny_llama(), tmp_path)


def test_applying_twice_is_refused():
    model = apply_hylorada(tiny_llama(), hy_config())
    with pytest.raises(ConfigError, match="already has HyLoRADA"):
        apply_hylorada(model, hy_config())


@pytest.mark.parametrize(("field", "value", "message"), [
    ("r", 0, "greater than or equal to 1"),
    ("dropout", 1.0, "less than 1"),
    ("num_buckets", 1, "greater than or equal to 2"),
    ("boundary_temperature", 0.0, "greater than 0"),
    ("landmarks", "everywhere", "Input should be"),
    ("target_modules", [], "matches nothing"),
    ("target_modules", "q_proj", "Input should be"),
    ("num_landmarks", 0, "needs num_landmarks >= 1"),
    ("max_positions", 4, "num_buckets=32 is more than max_positions=4"),
])
def test_config_validation_names_the_problem(field, value, message):
    with pytest.raises(ValidationError, match=message):
        HyLoRADAConfig(**{field: value})
    with pytest.raises(ConfigError, match=field):
        build(HyLoRADAConfig, {field: value})


def test_config_defaults_are_the_spec_defaults():
    assert HyLoRADAConfig().model_dump() == dict(
        r=8, alpha=16, dropout=0.05, use_rslora=True, use_dora=False, init_a="kaiming", target_modules=None,
        position_bias=True, landmarks="position_adaptive", num_landmarks=8, num_buckets=32, bucket_spacing="log",
        max_positions=None, boundary_temperature=0.1, boundary_assignment="relative", boundary_lr=None,
        boundary_diversity=0.0,
        boundary_freeze_steps=0, train_embeddings=False, train_norms=False)
    assert HyLoRADAConfig(landmarks="none", num_landmarks=0).num_landmarks == 0


def test_orthogonal_init_gives_orthonormal_rows():
    model = apply_hylorada(tiny_llama(), hy_config(init_a="orthogonal"))
    a = model.get_submodule(model.hylorada.adapted[0]).lora_A
    torch.testing.assert_close(a @ a.t(), torch.eye(a.shape[0]), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Context extension


def test_rope_scaling_changes_rotary_frequencies_before_the_model_is_built():
    config = tiny_llama().config
    base = LlamaForCausalLM(config).eval()
    theta = config.rope_parameters["rope_theta"]
    for kind in ("linear", "dynamic", "yarn"):
        scaled_config = rope_scaling(config, 4 * CONTEXT, kind)
        assert scaled_config.rope_parameters["rope_type"] == kind and scaled_config.rope_parameters["factor"] == 4
        assert config.rope_parameters["rope_type"] == "default"  # the input config is not modified
        torch.manual_seed(0)
        scaled = LlamaForCausalLM(scaled_config).eval()
        scaled.load_state_dict(base.state_dict())
        inv_freq = scaled.model.rotary_emb.inv_freq
        if kind == "linear":  # positions divided by the factor
            torch.testing.assert_close(inv_freq, base.model.rotary_emb.inv_freq / 4)
        if kind == "yarn":  # the highest frequencies are kept, the lowest interpolated
            assert torch.isclose(inv_freq[0], base.model.rotary_emb.inv_freq[0])
            assert inv_freq[-1] < base.model.rotary_emb.inv_freq[-1]
        long_ids = token_batch(1, 2 * CONTEXT)  # dynamic rescales only past the original context
        assert not torch.allclose(lm_logits(scaled, long_ids), lm_logits(base, long_ids), atol=1e-4)
    assert theta == rope_scaling(config, CONTEXT, "linear").rope_parameters["rope_theta"]
    assert rope_scaling(config, CONTEXT // 2, "linear").rope_parameters["rope_type"] == "default"
    with pytest.raises(ConfigError, match="does not use RoPE"):
        rope_scaling(tiny_gpt2().config, 256)


def test_gpt2_position_table_interpolation_keeps_endpoints_and_midpoints():
    model = tiny_gpt2()
    old = model.transformer.wpe.weight.detach().clone()  # [64, d]
    interpolate_position_embeddings(model, 2 * CONTEXT - 1)
    new = model.transformer.wpe.weight.detach()
    assert new.shape == (2 * CONTEXT - 1, old.shape[1]) and model.config.n_positions == 2 * CONTEXT - 1
    torch.testing.assert_close(new[::2], old)  # every old position lands on an even new row
    torch.testing.assert_close(new[1::2], (old[:-1] + old[1:]) / 2)
    logits = lm_logits(model, token_batch(1, 100))
    assert logits.shape == (1, 100, logits.shape[-1]) and torch.isfinite(logits).all()
