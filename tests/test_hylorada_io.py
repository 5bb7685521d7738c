"""Saving and loading HyLoRADA adapters, every bad input the loader must name, config validation, and
context extension of the base (RoPE scaling, GPT-2 position-table interpolation)."""

from __future__ import annotations

import json
import math
import shutil
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from conftest import builtin_texts
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
        position_bias=True, bias_lr=None, landmarks="position_adaptive", num_landmarks=8, num_buckets=32,
        bucket_spacing="log", max_positions=None, boundary_temperature=0.1, boundary_assignment="relative",
        boundary_lr=None, boundary_diversity=0.0, boundary_freeze_steps=0, train_embeddings=False, train_norms=False)
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


# ---------------------------------------------------------------------------------------------------
# The context extension travels with the adapter: recorded by save_adapter, applied by load_adapter


def scaled_llama(kind: str, length: int = 4 * CONTEXT) -> LlamaForCausalLM:
    """The tiny Llama's weights in a model built with RoPE scaling to `length` tokens (what the studies train)."""
    base = tiny_llama()
    torch.manual_seed(0)
    model = LlamaForCausalLM(rope_scaling(base.config, length, kind)).eval()
    model.load_state_dict(base.state_dict())
    return model


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn"])
def test_rope_scaling_is_recorded_with_the_adapter_and_applied_on_load(kind, tmp_path):
    model = apply_hylorada(scaled_llama(kind), hy_config(landmarks="position_adaptive"), max_positions=4 * CONTEXT)
    perturb(model)
    save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["position_extension"]["rope_parameters"] == {**model.config.rope_parameters}
    assert meta["position_extension"]["rope_parameters"]["rope_type"] == kind
    fresh = tiny_llama()
    assert fresh.config.rope_parameters["rope_type"] == "default"
    loaded = load_adapter(fresh, tmp_path)
    assert loaded.config.rope_parameters == model.config.rope_parameters
    ids = token_batch(1, 3 * CONTEXT)  # past the original context, where the scaling matters
    assert torch.equal(lm_logits(loaded, ids), lm_logits(model, ids))
    torch.testing.assert_close(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq, rtol=0, atol=0)


def test_an_adapter_without_an_extension_records_none_and_a_refused_extension_leaves_the_model(tmp_path):
    plain = apply_hylorada(tiny_llama(), hy_config())
    save_adapter(plain, tmp_path / "plain")
    assert "position_extension" not in json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    scaled = apply_hylorada(scaled_llama("linear"), hy_config(), max_positions=4 * CONTEXT)
    save_adapter(scaled, tmp_path / "scaled")
    other = tiny_llama(rope_theta=500.0)  # another base: its rotary frequencies differ
    inv_freq = other.model.rotary_emb.inv_freq.clone()
    with pytest.raises(CheckpointError, match="rope_theta 10000.0, but this model has 500.0"):
        load_adapter(other, tmp_path / "scaled")
    assert other.config.rope_parameters["rope_type"] == "default" and not hasattr(other, "hylorada")
    assert torch.equal(other.model.rotary_emb.inv_freq, inv_freq)
    # the adapter's tensors do not fit: the scaling applied first is taken back
    narrow = tiny_llama(hidden_size=32, intermediate_size=64)
    with pytest.raises(CheckpointError, match="has shape"):
        load_adapter(narrow, tmp_path / "scaled")
    assert narrow.config.rope_parameters["rope_type"] == "default" and narrow.config.max_position_embeddings == CONTEXT
    assert narrow.model.rotary_emb.rope_type == "default"


@pytest.mark.parametrize("train_embeddings", [False, True])
def test_a_stretched_position_table_is_recorded_and_stretched_again_on_load(train_embeddings, tmp_path):
    model = interpolate_position_embeddings(tiny_gpt2(), 2 * CONTEXT)
    model = apply_hylorada(model, hy_config(train_embeddings=train_embeddings), max_positions=2 * CONTEXT)
    perturb(model)
    save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["position_extension"] == {"interpolated_positions": [CONTEXT, 2 * CONTEXT]}
    loaded = load_adapter(tiny_gpt2(), tmp_path)
    assert loaded.config.n_positions == 2 * CONTEXT
    ids = token_batch(1, 2 * CONTEXT - 8)
    assert torch.equal(lm_logits(loaded, ids), lm_logits(model, ids))
    wrong = tiny_gpt2(n_positions=CONTEXT // 2)
    with pytest.raises(CheckpointError, match=f"stretched from {CONTEXT} to {2 * CONTEXT} rows, but the model's "
                                              f"table has {CONTEXT // 2}"):
        load_adapter(wrong, tmp_path)
    assert wrong.transformer.wpe.num_embeddings == CONTEXT // 2


def independent_ppl(model, tokenizer, text: str, window: int) -> float:
    """Perplexity of one document, written out here: BOS + its tokens; each next `window` tokens are predicted
    from the `window` inputs that end just before the last of them (a short last chunk keeps a full window of
    context), every token once, NLL summed in float64."""
    ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    n = len(ids) - 1
    total = 0.0
    with torch.no_grad():
        for done in range(0, n, window):
            end = min(done + window, n)
            start = max(0, end - window)
            logits = model(input_ids=torch.tensor([ids[start:end]]), use_cache=False).logits[0]
            targets = torch.tensor(ids[start + 1:end + 1])
            scored = end - done  # the last `scored` positions predict tokens not predicted before
            total += F.cross_entropy(logits[-scored:].double(), targets[-scored:], reduction="sum").item()
    return math.exp(total / n)


def test_eval_ppl_with_the_adapter_reproduces_the_fine_tuned_rope_scaled_model(tiny_llama_dir, tmp_path, capsys,
                                                                               monkeypatch):
    from lmlab.cli import main
    from lmlab.engine.hooks import PaddedLM
    from lmlab.engine.train import TrainConfig, train
    from lmlab.models.hf import load_causal_lm, load_tokenizer

    length = 256  # the base's context is 128: fine-tuned at twice it with linear RoPE scaling, as the studies do
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    text = " ".join(builtin_texts()[:12])
    stream = tokenizer(text, add_special_tokens=False)["input_ids"]
    model = load_causal_lm(str(tiny_llama_dir), config_fn=partial(rope_scaling, max_length=length, kind="linear"))
    model = apply_hylorada(model, HyLoRADAConfig(r=4, alpha=8, dropout=0.0, num_landmarks=4, num_buckets=8),
                           max_positions=length)
    examples = [{"input_ids": stream[i:i + length]} for i in range(0, 4 * length, length)]
    # on the CPU also where there is a GPU: the CLI's evaluation below is compared with a CPU reference to 1e-5
    monkeypatch.setenv("LMLAB_DEVICE", "cpu")
    train(model, examples, TrainConfig(max_steps=3, batch_size=2, lr=5e-3, warmup_steps=0), seed=0, progress=False,
          hooks=PaddedLM(tokenizer.pad_token_id), device="cpu")
    save_adapter(model, tmp_path / "adapter")
    document = " ".join(builtin_texts()[40:46])
    (tmp_path / "doc.txt").write_text(document, encoding="utf-8")
    expected = independent_ppl(model.eval(), tokenizer, document, length)

    def eval_ppl(adapter) -> tuple[float, str]:
        code = main(["eval", "ppl", "--model", str(tiny_llama_dir), "--adapter", str(adapter), "--data",
                     str(tmp_path / "doc.txt"), "--max-length", str(length)])
        out, err = capsys.readouterr()
        assert code == 0, err
        return json.loads(out)["ppl"], err

    ppl, err = eval_ppl(tmp_path / "adapter")
    assert ppl == pytest.approx(expected, rel=1e-5)
    assert "lmlab:" not in err  # 256 tokens are within the scaled model's positions: no warning
    # without the recorded scaling (an adapter saved before it was recorded) the model is another one, and eval warns
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    del meta["position_extension"]
    shutil.copytree(tmp_path / "adapter", tmp_path / "unscaled")
    (tmp_path / "unscaled" / "adapter_config.json").write_text(json.dumps(meta))
    unscaled, err = eval_ppl(tmp_path / "unscaled")
    assert abs(unscaled / expected - 1) > 1e-3
    said = [line for line in err.splitlines() if line.startswith("lmlab:")]
    assert len(said) == 1 and said[0].startswith("lmlab: warning: --max-length 256 exceeds the model's 128 positions")
