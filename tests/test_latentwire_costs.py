"""KV-cache bytes from model configs (LatentWire costs)."""

import torch
from transformers import GPT2Config, LlamaConfig, LlamaForCausalLM, MistralConfig

from lmlab.latentwire.costs import element_bytes, kv_bytes_per_token, kv_cache_bytes, kv_layout, prompt_lengths


def test_kv_bytes_of_a_gqa_config_equal_the_hand_computed_value():
    # Llama-3.1-8B shape: 32 layers, 32 query heads, 8 kv heads, head_dim 4096/32 = 128, bf16.
    config = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=14336, vocab_size=128256)
    assert kv_layout(config) == (32, 8, 128)
    assert kv_bytes_per_token(config, 2) == 2 * 32 * 8 * 128 * 2 == 131072
    assert kv_cache_bytes(config, 150, 2) == 131072 * 150


def test_kv_bytes_use_an_explicit_head_dim_and_gpt2_names():
    mistral = MistralConfig(hidden_size=512, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                            head_dim=96)
    assert kv_bytes_per_token(mistral, 4) == 2 * 3 * 2 * 96 * 4
    gpt2 = GPT2Config(n_embd=768, n_layer=12, n_head=12)  # no GQA: kv heads = heads
    assert kv_bytes_per_token(gpt2, 4) == 2 * 12 * 12 * 64 * 4 == 73728


def test_element_bytes_follow_the_weights_and_prompt_lengths_count_real_tokens():
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=16))
    assert element_bytes(model) == 4
    assert element_bytes(model.to(torch.bfloat16)) == 2
    assert prompt_lengths(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])) == [2, 4]
