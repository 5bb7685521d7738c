"""BottleneckedGatedTranslator (docs/latentwire.md section 1)."""

import statistics

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmlab.engine.optim import param_groups
from lmlab.errors import ConfigError
from lmlab.latentwire.translator import (
    BottleneckedGatedTranslator,
    embedding_rms_median,
    optimizer_rules,
    parameter_count,
    translator_preset,
)

pytestmark = pytest.mark.usefixtures("one_thread")

D_SRC, D_TGT = 48, 64


def make_translator(num_queries=8, bottleneck=32, depth=2, heads=4, rms=0.37, seed=0):
    torch.manual_seed(seed)
    return BottleneckedGatedTranslator(D_SRC, D_TGT, num_queries, bottleneck, depth, heads, target_embed_rms=rms)


def open_gates(translator, value=0.7):
    with torch.no_grad():
        for name, param in translator.named_parameters():
            if "gate_" in name:
                param.fill_(value)


def test_queries_are_orthonormal_rows_of_one_matrix():
    queries = make_translator(num_queries=8, bottleneck=32).queries.detach()
    torch.testing.assert_close(queries @ queries.T, torch.eye(8), atol=1e-5, rtol=0)
    wide = make_translator(num_queries=48, bottleneck=32).queries.detach()  # K > b: columns orthonormal instead
    torch.testing.assert_close(wide.T @ wide, torch.eye(32), atol=1e-5, rtol=0)


def test_closed_gates_make_soft_tokens_independent_of_the_source():
    translator = make_translator()
    a = translator(torch.randn(2, 5, D_SRC), torch.ones(2, 5))
    b = translator(100 * torch.randn(2, 9, D_SRC), torch.ones(2, 9))
    assert torch.equal(a, b)
    open_gates(translator)
    c = translator(torch.randn(2, 5, D_SRC), torch.ones(2, 5))
    assert (a - c).abs().max() > 1e-3  # the same comparison does see the source once the gates open


def test_embedding_rms_median_is_the_median_row_rms():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    weight = model.get_input_embeddings().weight.detach().tolist()
    by_hand = statistics.median((sum(v * v for v in row) / len(row)) ** 0.5 for row in weight)
    assert embedding_rms_median(model) == pytest.approx(by_hand, rel=1e-6)


def test_soft_tokens_rms_equals_the_target_statistic():
    translator = make_translator(rms=0.0213)
    open_gates(translator)
    soft = translator(1000 * torch.randn(3, 7, D_SRC), torch.ones(3, 7))  # [B, K, d_tgt]
    assert soft.shape == (3, 8, D_TGT)
    rms = soft.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, 0.0213), atol=1e-5, rtol=0)


def test_source_padding_is_masked_out_of_cross_attention():
    translator = make_translator()
    open_gates(translator)
    source = torch.randn(1, 5, D_SRC)
    alone = translator(source, torch.ones(1, 5))
    garbage = 50 * torch.randn(1, 4, D_SRC)
    left = translator(torch.cat([garbage, source], 1), torch.tensor([[0] * 4 + [1] * 5]))
    right = translator(torch.cat([source, garbage], 1), torch.tensor([[1] * 5 + [0] * 4]))
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-5)


def closed_form_count(d_src, d_tgt, num_queries, bottleneck, depth):
    b = bottleneck
    inner = 8 * ((8 * b // 3 + 7) // 8)
    block = (3 * b + d_src  # four RMSNorms (three at width b, one over the source)
             + 4 * b * b  # self-attention q, k, v, o
             + 2 * b * b + 2 * b * d_src  # cross-attention q, o and k, v from the source width
             + 3 * b * inner  # SwiGLU gate, up, down
             + 3)  # gates
    return num_queries * b + depth * block + b + b * d_tgt


def test_parameter_count_is_counted_from_the_module():
    assert parameter_count(make_translator()) == closed_form_count(D_SRC, D_TGT, 8, 32, 2)
    shape = translator_preset(64)
    with torch.device("meta"):  # the full-size preset, without allocating its weights
        big = BottleneckedGatedTranslator(4096, 4096, **shape.model_dump(), target_embed_rms=0.01)
    assert parameter_count(big) == closed_form_count(4096, 4096, 64, 1024, 8)


def test_presets_follow_the_notes_and_tiny_shapes_come_from_arguments():
    assert translator_preset(64).model_dump() == {"num_queries": 64, "bottleneck": 1024, "depth": 8, "heads": 16}
    assert translator_preset(48).model_dump() == {"num_queries": 48, "bottleneck": 1024, "depth": 6, "heads": 16}
    assert translator_preset(32).model_dump() == {"num_queries": 32, "bottleneck": 768, "depth": 4, "heads": 12}
    assert translator_preset(32, bottleneck=64, heads=4).model_dump() == {
        "num_queries": 32, "bottleneck": 64, "depth": 4, "heads": 4}
    assert translator_preset(4, bottleneck=32, depth=1, heads=2).num_queries == 4
    with pytest.raises(ConfigError, match="no translator preset for num_queries=4"):
        translator_preset(4)
    with pytest.raises(ConfigError, match="divisible by heads"):
        translator_preset(8, bottleneck=30, depth=1, heads=4)


def test_optimizer_rules_give_gates_three_times_the_lr_and_no_decay():
    translator = make_translator()
    groups = param_groups(translator, lr=1e-4, weight_decay=0.1, rules=optimizer_rules())
    by_param = {id(p): g for g in groups for p in g["params"]}
    for name, param in translator.named_parameters():
        group = by_param[id(param)]
        if "gate_" in name:
            assert (group["lr"], group["weight_decay"]) == (pytest.approx(3e-4), 0.0), name
        elif "norm_" in name:
            assert (group["lr"], group["weight_decay"]) == (1e-4, 0.0), name
        else:
            assert (group["lr"], group["weight_decay"]) == (1e-4, 0.1), name
