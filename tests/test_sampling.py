"""Sampling: logits processors against hand-computed values, greedy decoding, eos handling, seeded draws."""

import torch
from torch import nn

from lmlab.eval.sampling import apply_repetition_penalty, apply_temperature, apply_top_k, apply_top_p, sample
from lmlab.mu import MUConfig, MUModel


class FixedLogits(nn.Module):
    """A model whose next-token logits are the same at every step: one row of `logits` [B, V] per sequence."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.logits[:, None, :].expand(input_ids.shape[0], input_ids.shape[1], -1)


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits[0]).nonzero().flatten().tolist())


def test_repetition_penalty_lowers_repeated_tokens_whatever_the_sign():
    logits = torch.tensor([[2.0, -2.0, 0.5, 0.0, 1.0]])
    previous = torch.tensor([[0, 1, 1, 0]])  # repeats count once, as in CTRL
    penalised = apply_repetition_penalty(logits, previous, 2.0)
    assert torch.equal(penalised, torch.tensor([[1.0, -4.0, 0.5, 0.0, 1.0]]))
    before, after = logits.softmax(-1)[0], penalised.softmax(-1)[0]
    assert after[0] < before[0]  # positive logit, divided
    assert after[1] < before[1]  # negative logit, multiplied (dividing it would raise its probability)
    assert torch.equal(apply_repetition_penalty(logits, previous, 1.0), logits)


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    assert kept(apply_top_k(logits, 2)) == {1, 3}
    assert kept(apply_top_k(logits, 1)) == {1}
    assert kept(apply_top_k(logits, 0)) == {0, 1, 2, 3, 4}
    assert torch.equal(apply_top_k(logits, 3)[0, [1, 2, 3]], logits[0, [1, 2, 3]])


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])  # sorted: token 1 (0.5), 3 (0.3), 0 (0.15), 2 (0.05)
    logits = probs.log()
    assert kept(apply_top_p(logits, 0.45)) == {1}
    assert kept(apply_top_p(logits, 0.7)) == {1, 3}
    assert kept(apply_top_p(logits, 0.9)) == {1, 3, 0}
    assert kept(apply_top_p(logits, 0.99)) == {0, 1, 2, 3}
    assert kept(apply_top_p(logits, 0.01)) == {1}  # the most likely token is always kept
    assert kept(apply_top_p(logits, 1.0)) == {0, 1, 2, 3}


def test_temperature_rescales_the_sampled_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    torch.testing.assert_close(apply_temperature(logits, 2.0), torch.tensor([[0.0, 0.5, 1.0]]))
    rows = 4000
    model = FixedLogits(logits.expand(rows, -1))
    draws = sample(model, torch.zeros(rows, 1, dtype=torch.long), 1, temperature=2.0,
                   generator=torch.Generator().manual_seed(0))
    frequencies = torch.bincount(draws.flatten(), minlength=3) / rows
    torch.testing.assert_close(frequencies, torch.tensor([0.0, 0.5, 1.0]).softmax(-1), rtol=0, atol=0.03)


def test_sampled_tokens_come_from_the_top_k_and_top_p_sets():
    logits = torch.tensor([[0.1, 3.0, 2.9, -1.0, 2.0, 0.0]])
    model = FixedLogits(logits)
    generator = torch.Generator().manual_seed(0)
    top2 = sample(model, torch.zeros(1, 1, dtype=torch.long), 50, top_k=2, generator=generator)
    assert set(top2.flatten().tolist()) == {1, 2}
    # softmax: token 1 ~ 0.42, token 2 ~ 0.38 (together ~ 0.80) -> top_p 0.75 keeps exactly {1, 2}
    nucleus = sample(model, torch.zeros(1, 1, dtype=torch.long), 50, top_p=0.75, generator=generator)
    assert set(nucleus.flatten().tolist()) == {1, 2}


def greedy_reference(model: nn.Module, ids: torch.Tensor, steps: int, context: int) -> torch.Tensor:
    for _ in range(steps):
        next_token = model(ids[:, -context:])[:, -1].argmax(-1)
        ids = torch.cat([ids, next_token[:, None]], dim=1)
    return ids


@torch.no_grad()
def test_temperature_zero_is_argmax_and_crops_to_the_context():
    torch.manual_seed(0)
    model = MUModel(MUConfig(vocab_size=64, max_seq_len=16, n_layers=2)).eval()
    prompt = torch.randint(0, 64, (2, 12))
    greedy = sample(model, prompt, 10, temperature=0)  # runs past max_seq_len: the context is cropped
    assert greedy.shape == (2, 10)
    assert torch.equal(greedy, greedy_reference(model, prompt, 10, context=16)[:, 12:])
    top1 = sample(model, prompt, 10, top_k=1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(top1, greedy)


def test_repetition_penalty_changes_greedy_choice():
    model = FixedLogits(torch.tensor([[0.0, 2.0, 1.5, -3.0]]))
    prompt = torch.tensor([[0]])
    assert sample(model, prompt, 3, temperature=0).tolist() == [[1, 1, 1]]
    # 2.0 / 1.5 = 1.33 < 1.5: after emitting token 1 once, token 2 wins; then token 1 again (1.33 > 1.0).
    assert sample(model, prompt, 3, temperature=0, repetition_penalty=1.5).tolist() == [[1, 2, 1]]


def test_finished_rows_are_padded_with_eos_and_generation_stops_when_all_finish():
    eos = 3
    logits = torch.tensor([[0.0, 0.0, 0.0, 5.0], [0.0, 5.0, 0.0, 0.0]])  # row 0 wants eos, row 1 never
    prompt = torch.zeros(2, 2, dtype=torch.long)
    out = sample(FixedLogits(logits), prompt, 4, temperature=0, eos_token_id=eos)
    assert out.tolist() == [[3, 3, 3, 3], [1, 1, 1, 1]]
    early = sample(FixedLogits(logits[:1]), prompt[:1], 4, temperature=0, eos_token_id=eos)
    assert early.tolist() == [[3]]


def test_seeded_sampling_is_reproducible_and_restores_training_mode():
    torch.manual_seed(0)
    model = MUModel(MUConfig(vocab_size=64, max_seq_len=16, n_layers=2, dropout=0.1)).train()
    prompt = torch.randint(0, 64, (1, 4))
    kwargs = {"temperature": 0.9, "top_k": 20, "top_p": 0.95, "repetition_penalty": 1.2}
    first = sample(model, prompt, 8, generator=torch.Generator().manual_seed(7), **kwargs)
    second = sample(model, prompt, 8, generator=torch.Generator().manual_seed(7), **kwargs)
    assert torch.equal(first, second)
    assert model.training
