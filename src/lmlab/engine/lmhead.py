"""The language-model loss without the full logits: the LM head and the cross-entropy, chunk by chunk of tokens.

The plain loss computes `logits = hidden @ W^T` for every token ([tokens, vocab], upcast to float32) and keeps a
[tokens, vocab] gradient for the backward pass: at 128k tokens over a 128k vocabulary that is 67 GB of float32.
`linear_nll` computes the same summed NLL in chunks of `chunk` tokens: per chunk the logits in the compute dtype
(the autocast dtype, else the weights'), upcast to float32, their log-sum-exp and the chunk's loss, and - when a
gradient is needed - at once the chunk's gradient with respect to the hidden states and the head's weight (and
bias), so peak memory holds O(chunk x vocab) of logits, not O(tokens x vocab). The result equals the plain path
(`F.cross_entropy` on the full float32 logits) to float rounding, in value and gradients.

`head_loss` runs a model so that it never forms the full logits: a forward pre-hook on its output layer (an
`nn.Linear`: `get_output_embeddings()` of Hugging Face models and of lmlab's MU / dense models) records the hidden
states the head reads and hands the head an empty slice of them; the loss then comes from `linear_nll` with the
head's weight. Models whose head is not a plain Linear (an adapter on the head) or whose logits are transformed
after the head (soft-capping, logit scales) keep the plain path.

`chunked_scores` scores evaluation batches the same way: per token its NLL and whether the argmax is the label,
chunk by chunk, without a gradient (`lmlab.eval.perplexity.window_nll`).

`train.kernels=liger` on CUDA uses liger-kernel's fused linear cross-entropy (Triton) instead of the torch chunks
where the loss has no per-token weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from lmlab.engine.nll import IGNORE_INDEX, take_grads

# `auto`: chunk when the float32 logits of a micro-batch would exceed this many numbers (256 MiB), in chunks of
# at most this many numbers; below it the plain path is as lean and a little faster on small models
AUTO_LOGITS = 2**26
# logits that a head transforms after the matmul: the chunked loss would leave the transform out
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def chunk_size(setting: int | str | None, tokens: int, vocab: int) -> int | None:
    """Tokens per chunk for `train.loss_chunk` = `setting` on a micro-batch of `tokens` x `vocab` logits; None: the
    plain path. `auto` chunks only where the float32 logits would pass AUTO_LOGITS numbers; 0 / None never."""
    if setting in (None, 0):
        return None
    if setting == "auto":
        if tokens * vocab <= AUTO_LOGITS:
            return None
        return max(1, AUTO_LOGITS // vocab)
    return int(setting)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if not torch.is_autocast_enabled(device.type):
        return None
    getter = getattr(torch, "get_autocast_dtype", None)
    if getter is not None:
        return getter(device.type)
    return torch.get_autocast_gpu_dtype() if device.type == "cuda" else torch.get_autocast_cpu_dtype()


def linear_nll(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
               row_weights: torch.Tensor | None = None, chunk: int = 4096,
               ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """sum_i w_i * -log softmax(hidden_i @ weight^T + bias)[labels_i] over rows whose label is not `ignore_index`
    (w_i = 1 without `row_weights`); hidden [N, d], weight [V, d], bias [V] or None, labels [N], row_weights [N].

    In the autocast dtype under autocast (as the head's matmul would run), else in the promoted dtype of hidden and
    weight; the log-softmax in float32 (float64 for float64 inputs). Never more than `chunk` rows of logits at once.
    """
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1] or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"linear_nll takes hidden [N, d], weight [V, d] and labels [N], got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)} and {tuple(labels.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    compute = _autocast_dtype(hidden.device) or torch.promote_types(hidden.dtype, weight.dtype)
    if row_weights is not None:
        row_weights = row_weights.detach()
    return _ChunkedLinearNLL.apply(hidden, weight, bias, labels, row_weights, chunk, ignore_index, compute)


class _ChunkedLinearNLL(torch.autograd.Function):
    """Forward computes the loss and (when needed) its gradients chunk by chunk; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, row_weights, chunk, ignore_index, compute):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        accumulate = torch.float64 if compute == torch.float64 else torch.float32
        device = hidden.device
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=accumulate, device=device) if want_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=accumulate, device=device) if want_b else None
        total = torch.zeros((), dtype=accumulate, device=device)
        with torch.autocast(device.type, enabled=False):
            w = weight.to(compute)
            b = bias.to(compute) if bias is not None else None
            for start in range(0, hidden.shape[0], chunk):
                end = min(start + chunk, hidden.shape[0])
                h = hidden[start:end].to(compute)
                target = labels[start:end]
                logits = (torch.addmm(b, h, w.t()) if b is not None else h @ w.t()).to(accumulate)  # [c, V]
                valid = target != ignore_index
                scale = valid.to(accumulate)
                if row_weights is not None:
                    scale = scale * row_weights[start:end].to(accumulate)
                index = target.masked_fill(~valid, 0).unsqueeze(1)
                lse = torch.logsumexp(logits, dim=1)  # [c]
                # masked_fill, not only the product with `scale`: an ignored row's term may be inf (inf * 0 = nan)
                nll = (lse - logits.gather(1, index).squeeze(1)).masked_fill(~valid, 0.0)
                total += (nll * scale).sum()
                if not (want_h or want_w or want_b):
                    continue
                # d loss / d logits = scale * (softmax - one_hot(label)), formed in place in the chunk's buffer
                grad = logits.sub_(lse.unsqueeze(1)).exp_()
                grad.scatter_add_(1, index, -valid.to(accumulate).unsqueeze(1))
                grad.mul_(scale.unsqueeze(1))
                if want_b:
                    grad_b += grad.sum(0)
                grad = grad.to(compute)
                if want_h:
                    grad_h[start:end] = grad @ w
                if want_w:
                    grad_w += grad.t() @ h
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        out = [None if g is None else _scale_(g, grad_out).to(dtype)
               for g, dtype in zip(take_grads(ctx, "linear_nll"), ctx.dtypes, strict=True)]
        return out[0], out[1], out[2], None, None, None, None, None


def _scale_(grad: torch.Tensor, grad_out: torch.Tensor, block: int = 1 << 22) -> torch.Tensor:
    """grad *= grad_out in place. In float16 the factor itself may not fit (GradScaler starts at 65536, above
    float16's 65504, so casting it gives inf): float16 gradients are scaled in float32, a block at a time."""
    if grad.dtype != torch.float16:
        return grad.mul_(grad_out.to(grad.dtype))
    flat = grad.view(-1)
    for part in flat.split(block):
        part.copy_(part.float().mul_(grad_out))
    return grad


# ---------------------------------------------------------------------------------------------------
# The model's side: hidden states and head without the logits


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "module", None) if isinstance(model, nn.parallel.DistributedDataParallel) else None
        inner = inner if inner is not None else getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def output_head(model: nn.Module) -> nn.Linear | None:
    """The model's output layer when the chunked loss can stand in for it: a plain `nn.Linear` without hooks of its
    own (but those that run a float32 head on a half-precision base, which the chunks do as well), whose logits the
    model does not transform afterwards; else None."""
    core = _unwrap(model)
    getter = getattr(core, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if type(head) is not nn.Linear:
        return None
    hooks = [*head._forward_hooks.values(), *head._forward_pre_hooks.values()]
    if not all(getattr(hook, "lmlab_dtype_cast", False) for hook in hooks):  # HyLoRADA's float32 tied head: fine
        return None
    config = getattr(core, "config", None)
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value not in (0, 1):
            return None
    return head


@contextlib.contextmanager
def hidden_states_of(head: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block, calls of `head` record their input in the yielded list and compute the head on an empty
    slice of it (the model's forward then returns empty logits)."""
    seen: list[torch.Tensor] = []

    def capture(module, args):
        hidden = args[0]
        seen.append(hidden)
        return (hidden[..., :0, :], *args[1:])

    handle = head.register_forward_pre_hook(capture)
    try:
        yield seen
    finally:
        handle.remove()


@torch.no_grad()
def chunked_scores(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor,
                   chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation without the full logits: per row of `hidden` ([N, d]) its NLL of `labels` ([N]; 0 where the label
    is IGNORE_INDEX) and whether the argmax is the label, `chunk` rows at a time - the logits in the head's dtype
    then float32, as the plain path computes them."""
    nll = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
    hits = torch.zeros(labels.shape, dtype=torch.bool, device=hidden.device)
    for start in range(0, labels.numel(), chunk):
        end = min(start + chunk, labels.numel())
        logits = head(hidden[start:end]).float()
        target = labels[start:end]
        valid = target != IGNORE_INDEX
        rows = torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="none")
        nll[start:end] = rows.masked_fill(~valid, 0.0)
        hits[start:end] = (logits.argmax(-1) == target) & valid
    return nll, hits


def liger_loss(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor) -> torch.Tensor:
    """liger-kernel's fused linear cross-entropy (CUDA, Triton), summed over the counted rows."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
    return loss(head.weight, hidden, labels, head.bias)
