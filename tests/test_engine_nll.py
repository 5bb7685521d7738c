"""token_nll (lmlab.engine.nll) against F.cross_entropy: value and gradient, ignored rows, dtypes, misuse."""

import pytest
import torch
import torch.nn.functional as F

from lmlab.engine.nll import token_nll


def reference(logits: torch.Tensor, labels: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = logits.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(leaf.float(), labels, ignore_index=-100, reduction="sum")
    (loss * weight).backward()
    return loss.detach(), leaf.grad


def ours(logits: torch.Tensor, labels: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = logits.detach().clone().requires_grad_(True)
    loss = token_nll(leaf, labels)
    (loss * weight).backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("ignored", [0, 1, 7])
def test_value_and_gradient_equal_cross_entropy(ignored):
    gen = torch.Generator().manual_seed(ignored)
    logits = torch.randn(23, 97, generator=gen) * 3
    labels = torch.randint(0, 97, (23,), generator=gen)
    labels[torch.randperm(23, generator=gen)[:ignored]] = -100
    value, grad = ours(logits, labels, 0.37)
    expected_value, expected_grad = reference(logits, labels, 0.37)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, expected_value, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)
    if ignored:
        assert grad[labels == -100].abs().max().item() == 0


def test_bfloat16_logits_are_scored_in_float32_and_get_a_bfloat16_gradient():
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(16, 50, generator=gen) * 4).bfloat16()
    labels = torch.randint(0, 50, (16,), generator=gen)
    labels[3] = -100
    value, grad = ours(logits, labels, 1.0)
    expected_value, expected_grad = reference(logits, labels, 1.0)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(value, expected_value, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad)


def test_every_row_ignored_gives_zero_loss_and_gradient():
    logits = torch.randn(4, 9, requires_grad=True)
    loss = token_nll(logits, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0 and logits.grad.abs().max().item() == 0


def test_an_ignored_row_with_minus_infinity_logits_does_not_poison_the_loss():
    logits = torch.randn(3, 6)
    logits[1, 0] = float("-inf")  # e.g. a token masked out of the vocabulary, on a row the loss ignores
    labels = torch.tensor([2, -100, 5])
    value, grad = ours(logits, labels, 1.0)
    expected_value, expected_grad = reference(logits, labels, 1.0)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    torch.testing.assert_close(value, expected_value)
    torch.testing.assert_close(grad, expected_grad)


def test_without_autograd_it_is_cross_entropy():
    logits, labels = torch.randn(5, 11), torch.tensor([1, 2, -100, 4, 10])
    with torch.no_grad():
        value = token_nll(logits.requires_grad_(), labels)
    assert value.item() == pytest.approx(F.cross_entropy(logits.detach(), labels, reduction="sum").item(), rel=1e-6)


def test_a_second_backward_is_refused_rather_than_wrong():
    logits = torch.randn(3, 5, requires_grad=True)
    loss = token_nll(logits, torch.tensor([0, 1, 2]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_bad_shapes_and_labels_are_refused():
    with pytest.raises(ValueError, match=r"logits \[N, V\] and labels \[N\]"):
        token_nll(torch.randn(2, 3, 4, requires_grad=True), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises((IndexError, RuntimeError)):
        token_nll(torch.randn(2, 3, requires_grad=True), torch.tensor([0, 3]))
