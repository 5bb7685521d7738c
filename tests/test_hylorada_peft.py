"""LoRA / rsLoRA / DoRA numerics against peft, adapters moving both ways between the libraries, and merging."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from lmlab.errors import CheckpointError, ConfigError
from lmlab.hylorada import HyLoRADALinear, apply_hylorada, export_peft, load_adapter, merge_adapter
from lmlab.hylorada.model import hylorada_state
from test_hylorada_model import BUILDERS, hy_config, lm_logits, perturb, token_batch

# peft itself calls a transformers API that is deprecated in transformers 5
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

TARGETS = {"gpt2": ["attn.c_attn", "attn.c_proj"], "llama": ["q_proj", "k_proj", "v_proj", "o_proj"]}
VARIANTS = {"lora": dict(use_rslora=False, use_dora=False), "rslora": dict(use_rslora=True, use_dora=False),
            "dora": dict(use_rslora=True, use_dora=True)}
CASES = [(arch, variant) for arch in ("gpt2", "llama") for variant in VARIANTS]


def peft_twin(arch: str, variant: str):
    """peft's LoRA on a fresh copy of the base, with B (and for DoRA m) moved off their initial values."""
    options = VARIANTS[variant]
    model = get_peft_model(BUILDERS[arch](), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS[arch], fan_in_fan_out=arch == "gpt2",
        use_rslora=options["use_rslora"], use_dora=options["use_dora"]))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=gen))
    return model.eval()


def ours_like(arch: str, variant: str, peft_model):
    """Our adapter on an identical base with peft's A, B and m copied in."""
    model = apply_hylorada(BUILDERS[arch](), hy_config(position_bias=False, landmarks="none", **VARIANTS[variant]))
    with torch.no_grad():
        for name in hylorada_state(model).adapted:
            ours, theirs = model.get_submodule(name), peft_model.base_model.model.get_submodule(name)
            ours.lora_A.copy_(theirs.lora_A["default"].weight)
            ours.lora_B.copy_(theirs.lora_B["default"].weight)
            if ours.lora_magnitude is not None:
                ours.lora_magnitude.copy_(theirs.lora_magnitude_vector["default"].weight)
    return model


@pytest.mark.parametrize(("arch", "variant"), CASES)
def test_outputs_equal_peft(arch, variant):
    theirs = peft_twin(arch, variant)
    ours = ours_like(arch, variant, theirs)
    ids = token_batch(2, 16)
    expected = lm_logits(theirs, ids)
    assert (expected - lm_logits(BUILDERS[arch](), ids)).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(lm_logits(ours, ids), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("arch", "variant"), CASES)
def test_load_adapter_reads_peft_save_pretrained(arch, variant, tmp_path):
    theirs = peft_twin(arch, variant)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(BUILDERS[arch](), tmp_path)
    ids = token_batch(2, 16)
    torch.testing.assert_close(lm_logits(ours, ids), lm_logits(theirs, ids), rtol=0, atol=1e-5)
    config = hylorada_state(ours).config
    assert (config.r, config.alpha, config.use_rslora, config.use_dora) == (
        4, 8, VARIANTS[variant]["use_rslora"], VARIANTS[variant]["use_dora"])


def test_peft_adapter_for_another_architecture_is_refused(tmp_path):
    peft_twin("llama", "lora").save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"does not fit this model.*model\.layers\.0\.self_attn"):
        load_adapter(BUILDERS["gpt2"](), tmp_path)


@pytest.mark.parametrize(("arch", "variant"), CASES)
def test_export_peft_loads_in_peft_with_our_logits(arch, variant, tmp_path):
    ours = ours_like(arch, variant, peft_twin(arch, variant))
    export_peft(ours, tmp_path)
    theirs = PeftModel.from_pretrained(BUILDERS[arch](), tmp_path).eval()
    ids = token_batch(2, 16)
    torch.testing.assert_close(lm_logits(theirs, ids), lm_logits(ours, ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("arch", "variant"), [(a, v) for a in ("gpt2", "llama") for v in ("lora", "dora")])
def test_merged_model_equals_unmerged_and_saves_as_plain_hf(arch, variant, tmp_path):
    model = apply_hylorada(BUILDERS[arch](), hy_config(position_bias=False, landmarks="none", **VARIANTS[variant]))
    perturb(model)
    ids = token_batch(2, 16)
    unmerged = lm_logits(model, ids)
    merged = merge_adapter(model)
    assert not any(isinstance(m, HyLoRADALinear) for m in merged.modules())
    assert not hasattr(merged, "hylorada")
    assert all(p.requires_grad for p in merged.parameters())  # back to the base model's own flags
    torch.testing.assert_close(lm_logits(merged, ids), unmerged, rtol=0, atol=1e-5)
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(lm_logits(reloaded, ids), unmerged, rtol=0, atol=1e-5)


def test_merge_and_export_refuse_position_dependent_parts(tmp_path):
    with_bias = apply_hylorada(BUILDERS["llama"](), hy_config(position_bias=True, landmarks="none"))
    with pytest.raises(ConfigError, match="position"):
        merge_adapter(with_bias)
    with_landmarks = apply_hylorada(BUILDERS["llama"](), hy_config(position_bias=False, landmarks="original"))
    with pytest.raises(ConfigError, match="landmarks"):
        merge_adapter(with_landmarks)
    for model in (with_bias, with_landmarks):
        with pytest.raises(ConfigError, match="peft's LoRA format cannot hold"):
            export_peft(model, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_merge_leaves_a_model_that_takes_a_fresh_adapter():
    model = apply_hylorada(BUILDERS["gpt2"](), hy_config(position_bias=False, landmarks="none"))
    perturb(model)
    merged = merge_adapter(copy.deepcopy(model))
    again = apply_hylorada(merged, hy_config(position_bias=False, landmarks="none"))
    ids = token_batch()
    torch.testing.assert_close(lm_logits(again, ids), lm_logits(model, ids), rtol=0, atol=1e-5)


def test_export_after_an_in_place_merge_says_so_and_a_context_extension_is_flagged(tmp_path):
    model = apply_hylorada(BUILDERS["llama"](), hy_config(position_bias=False, landmarks="none"))
    merge_adapter(model)
    with pytest.raises(ConfigError, match="merge_adapter folds them into the model in place: save_adapter / "
                                          "export_peft before it"):
        export_peft(model, tmp_path / "after-merge")
    from lmlab.hylorada import rope_scaling

    base = BUILDERS["llama"]()
    scaled = type(base)(rope_scaling(base.config, 4 * base.config.max_position_embeddings)).eval()
    scaled = apply_hylorada(scaled, hy_config(position_bias=False, landmarks="none"))
    with pytest.warns(RuntimeWarning, match="peft's format does not record"):
        export_peft(scaled, tmp_path / "scaled")
