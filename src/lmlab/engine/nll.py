"""Summed token negative log-likelihood with its gradient formed in the forward pass.

`token_nll(logits, labels)` equals `F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")`
in value and gradient. Why not call that: with a vocabulary of a few thousand, the loss is a large part of a
tiny model's train step on CPU, and most of it is passes over [N, V] buffers. `F.cross_entropy` allocates three
of them (log-softmax output, a zero-filled buffer for the NLL backward, the log-softmax backward's output);
this allocates one: the float32 log-softmax, turned in place into the gradient softmax - one-hot (zero on
ignored rows) while the forward still has it in cache, and scaled in place by the incoming gradient in
backward. Memory is that of `F.cross_entropy` (which also keeps its [N, V] log-softmax for backward).

Labels are shifted by the caller so that no [N, V] slice of the logits is copied (see `causal_lm_loss`).
Without autograd (evaluation) it is `F.cross_entropy` itself, as no gradient is needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_nll(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Sum over rows whose label is not `ignore_index` of -log softmax(logits)[label]; logits [N, V], labels [N].

    Computed in float32 whatever the logits' dtype; the gradient comes back in the logits' dtype.
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"token_nll takes logits [N, V] and labels [N], got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    return _TokenNLL.apply(logits, labels, ignore_index)


class _TokenNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index):
        valid = labels != ignore_index
        rows = valid.unsqueeze(1)
        targets = labels.masked_fill(~valid, 0).unsqueeze(1)  # [N, 1]; gather raises on labels outside [0, V)
        grad = torch.log_softmax(logits, dim=1, dtype=torch.float32)  # [N, V]
        # masked_fill, not a product with the mask: an ignored row's log-probability may be -inf (-inf * 0 = nan)
        nll = -grad.gather(1, targets).squeeze(1).masked_fill(~valid, 0.0).sum()
        # d nll / d logits = softmax - one_hot(label) on counted rows, 0 on ignored rows
        grad.exp_()
        grad.scatter_add_(1, targets, -rows.to(grad.dtype))
        if grad.device.type == "cpu":
            ignored = torch.nonzero(~valid).flatten()  # usually a few rows: touch only those
            if ignored.numel():
                grad.index_fill_(0, ignored, 0.0)
        else:  # no host sync on accelerators
            grad.masked_fill_(~rows, 0.0)
        ctx.grads, ctx.dtype = grad, logits.dtype
        return nll

    @staticmethod
    def backward(ctx, grad_out):
        return take_grads(ctx, "token_nll").mul_(grad_out).to(ctx.dtype), None, None


def take_grads(ctx, name: str):
    """The gradients a fused loss computed in its forward (`ctx.grads`), once: the first backward frees them (they
    are scaled in place), a second one is a readable error instead of silently wrong gradients."""
    grads = ctx.grads
    if grads is None:
        raise RuntimeError(f"{name}'s backward ran twice (retain_graph=True): its gradients are scaled in place by "
                           "the first backward; recompute the loss for a second backward")
    ctx.grads = None
    return grads
