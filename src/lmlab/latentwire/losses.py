"""LatentWire training losses (docs/latentwire.md section 3), each masked and computed in float32.

The training loop divides a loss's `total` by the global `weight` (answer tokens over accumulation
steps and processes), so every term here is a SUM. Per-token terms (NLL, KL) sum over answer tokens.
Per-item terms (InfoNCE, prompt alignment) are weighted by each item's answer-token count before
summing, so after the loop's division they are exact means over items weighted like the NLL.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field

from lmlab.config import Section
from lmlab.engine.nll import token_nll
from lmlab.latentwire.bridge import IGNORE, LatentWireBridge


class LossWeights(Section):
    """Weights of the loss terms; the NLL always has weight 1."""

    kl_weight: float = Field(0.0, ge=0.0)
    info_nce_weight: float = Field(0.05, ge=0.0)
    info_nce_start: int = Field(0, ge=0, description="optimizer step from which InfoNCE is on (notes: 50% of warmup)")
    temperature: float = Field(0.07, gt=0.0)
    prompt_align_weight: float = Field(0.0, ge=0.0)


def answer_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL, number of answer tokens) of logits [B, A, V] against labels [B, A] (IGNORE skipped)."""
    return token_nll(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE), (labels != IGNORE).sum()


def distill_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
               labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over answer tokens of KL(teacher || student), number of answer tokens); logits [B, A, V]."""
    valid = labels != IGNORE
    teacher = F.log_softmax(teacher_logits[valid].float(), dim=-1)  # [n, V]
    student = F.log_softmax(student_logits[valid].float(), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="sum"), valid.sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real positions: x [B, T, d], mask [B, T] -> [B, d] (float32)."""
    weights = mask.float().unsqueeze(-1)
    return (x.float() * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def gather_with_local_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Rows of every rank stacked [N, d] with this rank's rows at `offset`; gradient flows to the local rows.

    Ranks may hold different numbers of rows (a last, smaller batch): rows are padded to the largest
    count for `all_gather` and trimmed after. Without torch.distributed this is (x, 0).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    sizes = [int(s) for s in sizes]
    padded = F.pad(x.detach(), (0, 0, 0, max(sizes) - x.shape[0]))
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    parts = [part[:n] for part, n in zip(parts, sizes, strict=True)]
    parts[rank] = x  # all_gather returns copies without autograd history; put the live local rows back
    return torch.cat(parts), sum(sizes[:rank])


def info_nce(soft_summary: torch.Tensor, question_summary: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE per local item [B]: each soft summary [B, d] must pick its own question summary.

    Both are L2-normalised; the negatives are the other items of the batch on every rank.
    """
    soft = F.normalize(soft_summary.float(), dim=-1)
    question = F.normalize(question_summary.float(), dim=-1)
    all_soft, offset = gather_with_local_grad(soft)
    all_question, _ = gather_with_local_grad(question)
    own = torch.arange(soft.shape[0], device=soft.device) + offset
    soft_to_question = F.cross_entropy(soft @ all_question.T / temperature, own, reduction="none")
    question_to_soft = F.cross_entropy(question @ all_soft.T / temperature, own, reduction="none")
    return (soft_to_question + question_to_soft) / 2


def prompt_alignment(soft_tokens: torch.Tensor, question_embeds: torch.Tensor,
                     question_mask: torch.Tensor) -> torch.Tensor:
    """Per item [B]: MSE between soft token k and question token k, over the k < min(K, question length)."""
    n = min(soft_tokens.shape[1], question_embeds.shape[1])
    mask = question_mask[:, :n].float()  # question is right-padded, so token k is the k-th question token
    err = (soft_tokens[:, :n].float() - question_embeds[:, :n].float()).pow(2).mean(-1)  # [B, n]
    return (err * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def bridge_loss(bridge, batch: dict[str, torch.Tensor], step: int,
                weights: LossWeights) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(total sum, answer tokens, per-term sums) for the training loop; `bridge` may be DDP-wrapped.

    The student pass goes through `bridge(batch)` so DDP sees the translator's forward; teacher and
    question embeddings come from the frozen target without gradients.
    """
    core: LatentWireBridge = getattr(bridge, "module", bridge)
    out = bridge(batch)
    nll, tokens = answer_nll(out.logits, out.labels)
    total = nll
    logs = {"nll": nll.detach()}
    if weights.kl_weight > 0:
        kl, _ = distill_kl(core.teacher_logits(batch), out.logits, out.labels)
        total = total + weights.kl_weight * kl
        logs["kl"] = kl.detach()
    use_nce = weights.info_nce_weight > 0 and step >= weights.info_nce_start
    if use_nce or weights.prompt_align_weight > 0:
        item_tokens = (out.labels != IGNORE).sum(1).float()  # [B]
        question = core.question_embeddings(batch)  # [B, Q, d_tgt]
        question_mask = batch["question_mask"]
        if use_nce:
            soft_summary = out.soft_tokens.float().mean(1)  # soft tokens are never padding
            per_item = info_nce(soft_summary, masked_mean(question, question_mask), weights.temperature)
            nce = (per_item * item_tokens).sum()
            total = total + weights.info_nce_weight * nce
            logs["info_nce"] = nce.detach()
        if weights.prompt_align_weight > 0:
            align = (prompt_alignment(out.soft_tokens, question, question_mask) * item_tokens).sum()
            total = total + weights.prompt_align_weight * align
            logs["prompt_align"] = align.detach()
    return total, tokens, logs
