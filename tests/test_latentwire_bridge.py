"""The LatentWire bridge, its losses and the evaluation of all six systems, on tiny models.

Source: GPT-2 with a byte-level BPE; target: Llama (grouped-query attention) with a Metaspace BPE, so
the two differ in architecture, width and tokenizer, as in the study.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lmlab.latentwire.bridge import IGNORE, LatentWireBridge, PromptEncoder, build_translator
from lmlab.latentwire.evaluate import METRICS, SYSTEMS, evaluate_latentwire, summarize_eval, write_eval_samples
from lmlab.latentwire.gsm8k import GSM8KPrompt, cut_at_stop, extract_flexible, extract_strict
from lmlab.latentwire.losses import LossWeights, bridge_loss, info_nce
from lmlab.latentwire.translator import embedding_rms_median, translator_preset

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
     "answer": "He has 3 + 4 = 7 apples.\n#### 7"},
    {"question": "A box holds 6 pens. How many pens are in 2 boxes?", "answer": "2 * 6 = 12 pens.\n#### 12"},
    {"question": "Sara had $10 and spent $3.50. How much is left?", "answer": "10 - 3.50 = 6.50\n#### 6.50"},
]
ITEMS = [
    {"question": "Ann has 5 pens and loses 2. How many pens are left?", "answer": "5 - 2 = 3 pens.\n#### 3"},
    {"question": "A farm has 12 cows and 1,000 hens. How many animals are on the farm in total?",
     "answer": "12 + 1,000 = 1,012 animals.\n#### 1,012"},
    {"question": "Bob buys 3 boxes of 4 apples. How many apples?", "answer": "3 * 4 = 12 apples.\n#### 12"},
    {"question": "It was 2 degrees and fell by 5. What is it now?", "answer": "2 - 5 = -3\n#### -3"},
    {"question": "Mia picks 3 bags of 4 apples, finds 5 more apples and then gives 2 apples to Tom. "
                 "How many apples does Mia have now?",
     "answer": "Mia picks 3 * 4 = 12 apples. With the 5 she finds she has 12 + 5 = 17 apples. "
               "After giving 2 away she has 17 - 2 = 15 apples.\n#### 15"},
]
K = 4


def train_tokenizers():
    corpus = [f"Question: {it['question']}\nAnswer: {it['answer']}" for it in TRAIN + ITEMS] * 2
    byte_level = Tokenizer(models.BPE())
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.decoder = decoders.ByteLevel()
    byte_level.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    source = PreTrainedTokenizerFast(tokenizer_object=byte_level, bos_token="<|endoftext|>",
                                     eos_token="<|endoftext|>")  # GPT-2 style: no pad token
    metaspace = Tokenizer(models.BPE(unk_token="<unk>"))
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace()
    metaspace.decoder = decoders.Metaspace()
    metaspace.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=240, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=list("0123456789$.,#:?-+=*/\n")))
    target = PreTrainedTokenizerFast(tokenizer_object=metaspace, pad_token="<pad>", bos_token="<s>",
                                     eos_token="</s>", unk_token="<unk>")
    return source, target


@pytest.fixture(scope="module")
def parts():
    source_tok, target_tok = train_tokenizers()
    torch.manual_seed(0)
    source = GPT2LMHeadModel(GPT2Config(vocab_size=len(source_tok), n_embd=48, n_layer=2, n_head=4, n_positions=256,
                                        bos_token_id=source_tok.bos_token_id, eos_token_id=source_tok.eos_token_id))
    target = LlamaForCausalLM(LlamaConfig(vocab_size=len(target_tok), hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=256, pad_token_id=target_tok.pad_token_id,
                                          bos_token_id=target_tok.bos_token_id, eos_token_id=target_tok.eos_token_id))
    return source, target, source_tok, target_tok


def make_bridge(parts, mode="soft_only", n_shot=0, seed=1):
    source, target, source_tok, target_tok = parts
    torch.manual_seed(seed)
    translator = build_translator(source, target, translator_preset(K, bottleneck=32, depth=2, heads=4))
    with torch.no_grad():  # open the gates so the soft tokens carry the source (they start closed at 0)
        for name, param in translator.named_parameters():
            if "gate_" in name:
                param.uniform_(0.3, 0.9)
    encoder = PromptEncoder(source_tok, target_tok, GSM8KPrompt(tuple(TRAIN[:n_shot])), mode, K)
    return LatentWireBridge(source, target, translator, encoder)


def grads(bridge):
    return [p.grad.clone() for p in bridge.translator.parameters()]


def test_only_the_translator_trains_and_frozen_models_stay_in_eval(parts):
    bridge = make_bridge(parts)
    trainable = {id(p) for p in bridge.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in bridge.translator.parameters()}
    bridge.train()
    assert bridge.translator.training and not bridge.source.training and not bridge.target.training
    assert bridge.translator.target_embed_rms.item() == pytest.approx(embedding_rms_median(bridge.target))


@pytest.mark.parametrize("mode", ["soft_only", "soft_plus_text"])
def test_labels_cover_only_answer_tokens(parts, mode):
    bridge = make_bridge(parts, mode)
    enc = bridge.encoder
    batch = enc(ITEMS[:2])
    soft = bridge.soft_tokens(batch["source_ids"], batch["source_mask"])
    embeds, mask, labels = bridge.student_inputs(soft, batch["student_ids"], batch["student_mask"],
                                                 batch["answer_labels"])
    assert embeds.shape[:2] == mask.shape == labels.shape
    for row, item in enumerate(ITEMS[:2]):
        answer = enc.answer_ids(item)
        assert answer[-1] == parts[3].eos_token_id
        assert labels[row, -len(answer):].tolist() == answer
        assert (labels[row, : -len(answer)] == IGNORE).all()  # BOS, soft tokens, prompt text and padding
        real = mask[row].bool()
        prompt = enc.student_text(item)
        assert real.sum().item() == 1 + K + len(prompt) + len(answer)
        text_ids = batch["student_ids"][row][batch["student_mask"][row].bool()].tolist()
        assert text_ids == prompt + answer
    expected_prompt = enc.cue_ids() if mode == "soft_only" else enc.context_ids(ITEMS[0]) + enc.cue_ids()
    assert enc.student_text(ITEMS[0]) == expected_prompt


def test_remembered_token_ids_are_the_tokenizers_and_callers_cannot_change_them(parts):
    """The encoder tokenizes each question and answer once; what it returns is still the tokenizer's own ids."""
    enc = make_bridge(parts).encoder
    source_tok, target_tok = parts[2], parts[3]
    for item in ITEMS[:3]:
        for side, tok in (("source", source_tok), ("target", target_tok)):
            direct = tok(GSM8KPrompt.question(item), add_special_tokens=False)["input_ids"]
            assert enc.question_ids(item, side) == direct
            enc.question_ids(item, side).append(-1)  # a caller's edit of the list it was given
            assert enc.question_ids(item, side) == direct
        answer = target_tok(GSM8KPrompt.answer(item), add_special_tokens=False)["input_ids"]
        assert enc.answer_ids(item) == answer + [target_tok.eos_token_id]
    first, again = enc(ITEMS[:3]), enc(ITEMS[:3])
    assert all(torch.equal(first[key], again[key]) for key in first)


def unpadded_losses(bridge, item):
    """NLL and KL of one item computed without the bridge's batching: HF's own loss and a per-token loop."""
    enc, target = bridge.encoder, bridge.target
    embed = target.get_input_embeddings()
    source_ids = torch.tensor([enc.text_prompt(item, "source")])
    soft = bridge.translator(bridge.source(source_ids, output_hidden_states=True).hidden_states[-1],
                             torch.ones_like(source_ids))
    cue, answer = enc.student_text(item), enc.answer_ids(item)
    bos = enc.tokenizers["target"].bos_token_id
    student = torch.cat([embed(torch.tensor([[bos]])), soft, embed(torch.tensor([cue + answer]))], 1)
    labels = torch.tensor([[IGNORE] * (1 + K + len(cue)) + answer])
    out = target(inputs_embeds=student, labels=labels)
    nll = out.loss * len(answer)  # HF's mean over the shifted labels
    teacher_ids = torch.tensor([enc.text_prompt(item) + answer])
    teacher = target(input_ids=teacher_ids).logits[0, -len(answer) - 1: -1]
    student_logits = out.logits[0, -len(answer) - 1: -1]
    kl = 0.0
    for t, s in zip(teacher, student_logits, strict=True):
        p, log_p, log_q = torch.softmax(t, -1), torch.log_softmax(t, -1), torch.log_softmax(s, -1)
        kl += float((p * (log_p - log_q)).sum())
    return float(nll), kl, len(answer)


def test_nll_and_kl_equal_an_unbatched_computation(parts):
    bridge = make_bridge(parts)
    weights = LossWeights(kl_weight=0.5, info_nce_weight=0.0)
    total, tokens, logs = bridge_loss(bridge, bridge.encoder(ITEMS[1:2]), step=0, weights=weights)
    with torch.no_grad():
        nll, kl, n = unpadded_losses(bridge, ITEMS[1])
    assert int(tokens) == n
    assert float(logs["nll"]) == pytest.approx(nll, rel=1e-4)
    assert float(logs["kl"]) == pytest.approx(kl, rel=1e-3, abs=1e-5)
    assert total.item() == pytest.approx(nll + 0.5 * kl, rel=1e-4)


@pytest.mark.parametrize("mode", ["soft_only", "soft_plus_text"])
def test_padding_changes_no_loss_and_no_gradient(parts, mode):
    bridge = make_bridge(parts, mode)
    weights = LossWeights(kl_weight=1.0, info_nce_weight=0.0, prompt_align_weight=0.1)
    short, long = ITEMS[0], ITEMS[4]
    alone = {}
    for item in (short, long):
        bridge.zero_grad()
        total, tokens, logs = bridge_loss(bridge, bridge.encoder([item]), 0, weights)
        total.backward()
        alone[item["question"]] = (total.item(), int(tokens), {k: v.item() for k, v in logs.items()}, grads(bridge))
    batch = bridge.encoder([short, long])
    assert (batch["student_mask"][0] == 0).any() and (batch["source_mask"][0] == 0).any()  # short is padded
    # Padding must be inert whatever it holds: overwrite every padded id with random tokens.
    for key in ("source", "student", "teacher", "question"):
        ids, mask = batch[f"{key}_ids"], batch[f"{key}_mask"]
        ids[mask == 0] = torch.randint(5, 60, (int((mask == 0).sum()),))
    bridge.zero_grad()
    total, tokens, logs = bridge_loss(bridge, batch, 0, weights)
    total.backward()
    a, b = alone[short["question"]], alone[long["question"]]
    assert int(tokens) == a[1] + b[1]
    assert total.item() == pytest.approx(a[0] + b[0], rel=1e-4)
    for key in ("nll", "kl", "prompt_align"):
        assert logs[key].item() == pytest.approx(a[2][key] + b[2][key], rel=1e-4, abs=1e-6), key
    for got, g_short, g_long in zip(grads(bridge), a[3], b[3], strict=True):
        torch.testing.assert_close(got, g_short + g_long, atol=1e-5, rtol=1e-3)


def test_info_nce_equals_the_closed_form():
    torch.manual_seed(0)
    soft, question = torch.randn(3, 8), torch.randn(3, 8)
    got = info_nce(soft, question, temperature=0.2)
    cos = [[float(F.cosine_similarity(soft[i], question[j], dim=0)) / 0.2 for j in range(3)] for i in range(3)]
    for i in range(3):
        s2q = -cos[i][i] + math.log(sum(math.exp(c) for c in cos[i]))
        q2s = -cos[i][i] + math.log(sum(math.exp(cos[j][i]) for j in range(3)))
        assert got[i].item() == pytest.approx((s2q + q2s) / 2, rel=1e-5)


def test_info_nce_starts_at_its_step_and_is_weighted_by_answer_tokens(parts):
    bridge = make_bridge(parts)
    batch = bridge.encoder(ITEMS[:3])
    weights = LossWeights(info_nce_weight=0.05, info_nce_start=10)
    before, _, logs_before = bridge_loss(bridge, batch, step=9, weights=weights)
    after, _, logs = bridge_loss(bridge, batch, step=10, weights=weights)
    assert "info_nce" not in logs_before and before.item() == pytest.approx(logs_before["nll"].item())
    with torch.no_grad():
        out = bridge(batch)
        question = bridge.question_embeddings(batch)
        qmask = batch["question_mask"].float()[..., None]
        per_item = info_nce(out.soft_tokens.mean(1), (question * qmask).sum(1) / qmask.sum(1), 0.07)
        answer_tokens = torch.tensor([float(len(bridge.encoder.answer_ids(it))) for it in ITEMS[:3]])
    assert logs["info_nce"].item() == pytest.approx(float((per_item * answer_tokens).sum()), rel=1e-5)
    assert after.item() == pytest.approx(logs["nll"].item() + 0.05 * logs["info_nce"].item(), rel=1e-5)


def test_generation_inputs_of_the_controls(parts):
    bridge = make_bridge(parts)
    items = ITEMS[:2]
    bridged, mask = bridge.generation_inputs(items)
    zero, zero_mask = bridge.generation_inputs(items, zero_soft=True)
    shuffled, _ = bridge.generation_inputs(items, source_items=[ITEMS[1], ITEMS[0]])
    soft = slice(1, 1 + K)  # after BOS
    assert torch.equal(mask, zero_mask) and (zero[:, soft] == 0).all()
    torch.testing.assert_close(shuffled[0, soft], bridged[1, soft])
    torch.testing.assert_close(shuffled[1, soft], bridged[0, soft])
    torch.testing.assert_close(shuffled[:, 1 + K:], bridged[:, 1 + K:])  # the text stays the item's own


def test_all_six_systems_evaluate_and_report_every_metric(parts, tmp_path):
    bridge = make_bridge(parts, n_shot=1)
    enc = bridge.encoder
    result = evaluate_latentwire(bridge, ITEMS, batch_size=3, max_new_tokens=6)
    metrics = result.metrics
    assert set(metrics) == {f"{s}/{m}" for s in SYSTEMS for m in METRICS}
    n = len(ITEMS)
    assert bridge.target.config.num_key_value_heads == 2
    per_token = 2 * 2 * 2 * (64 // 4) * 4  # Llama target: 2 layers, 2 kv heads of 16, float32
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    text_tokens = mean([1 + len(enc.context_ids(it)) + len(enc.cue_ids()) for it in ITEMS])
    assert metrics["target_text/prompt_tokens"] == pytest.approx(text_tokens)
    assert metrics["bridged/prompt_tokens"] == 1 + K + len(enc.cue_ids())
    assert metrics["token_budget/prompt_tokens"] == pytest.approx(
        mean([1 + min(K, len(enc.question_ids(it))) + len(enc.cue_ids()) for it in ITEMS]))
    assert metrics["source_text/prompt_tokens"] == pytest.approx(mean([len(enc.text_prompt(it, "source"))
                                                                       for it in ITEMS]))
    assert metrics["bridged/compression"] == pytest.approx(mean([len(enc.context_ids(it)) for it in ITEMS]) / K)
    assert metrics["target_text/compression"] == 1.0
    for system in SYSTEMS:
        prompt_tokens = metrics[f"{system}/prompt_tokens"]
        if system == "source_text":
            src = bridge.source.config  # GPT-2: 2 layers, 4 heads of 12
            assert metrics[f"{system}/kv_bytes"] == pytest.approx(2 * src.n_layer * 4 * 12 * 4 * prompt_tokens)
        else:
            assert metrics[f"{system}/kv_bytes"] == pytest.approx(per_token * prompt_tokens)
        assert metrics[f"{system}/kv_bytes_saved"] == pytest.approx(per_token * text_tokens
                                                                   - metrics[f"{system}/kv_bytes"])
        low, high = metrics[f"{system}/acc_flexible_wilson95"]
        assert low <= metrics[f"{system}/acc_flexible"] <= high
        assert 0.0 <= metrics[f"{system}/invalid_rate"] <= 1.0
        assert metrics[f"{system}/latency_s"] > 0 and metrics[f"{system}/tokens_per_s"] >= 0
    assert result.notes["source_text/prompt_tokens"].startswith("counted in the source tokenizer")

    assert [s["index"] for s in result.samples] == list(range(n))
    assert [s["gold"] for s in result.samples] == ["3", "1012", "12", "-3", "15"]
    for sample in result.samples:
        assert set(sample["systems"]) == set(SYSTEMS)
        for record in sample["systems"].values():
            assert record["strict"] == extract_strict(cut_at_stop(record["output"]))
            assert record["flexible"] == extract_flexible(cut_at_stop(record["output"]))
            assert record["correct_flexible"] == (record["flexible"] == sample["gold"])

    path = write_eval_samples(tmp_path / "cell" / "eval_samples.jsonl", result.samples)
    summary = summarize_eval([tmp_path])
    assert path.exists() and set(summary) == set(SYSTEMS)
    for system, row in summary.items():
        assert row["total"] == n and row["valid"] + row["invalid"] == n
        assert row["invalid"] == round(metrics[f"{system}/invalid_rate"] * n)
        assert row["accuracy"] == pytest.approx(metrics[f"{system}/acc_flexible"])


def test_swapped_direction_llama_source_gpt2_target(parts):
    source, target, source_tok, target_tok = parts
    torch.manual_seed(2)
    translator = build_translator(target, source, translator_preset(K, bottleneck=32, depth=1, heads=4))
    encoder = PromptEncoder(target_tok, source_tok, GSM8KPrompt(), "soft_only", K)
    bridge = LatentWireBridge(target, source, translator, encoder)  # gates closed, as at initialisation
    total, tokens, logs = bridge_loss(bridge, encoder(ITEMS[:2]), 0, LossWeights(kl_weight=1.0))
    total.backward()
    assert set(logs) == {"nll", "kl", "info_nce"} and int(tokens) > 0
    for name in ("gate_sa", "gate_cross", "gate_ffn"):  # closed gates still receive gradient, so they can open
        assert getattr(translator.blocks[0], name).grad.abs() > 0, name
    result = evaluate_latentwire(bridge, ITEMS[:2], systems=("target_text", "bridged"), max_new_tokens=4)
    gpt2_per_token = 2 * 2 * 4 * 12 * 4  # 2 layers, 4 heads of 12, float32
    assert result.metrics["bridged/kv_bytes"] == gpt2_per_token * (1 + K + len(encoder.cue_ids()))
