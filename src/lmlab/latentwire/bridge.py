"""The bridge: frozen source -> trainable translator -> frozen target (docs/latentwire.md sections 1-2).

Conditioning modes (the same one in training and evaluation):
- `soft_only`:      target input = [BOS] [soft tokens] + "\\nAnswer:"       (the target never sees the question)
- `soft_plus_text`: target input = [BOS] [soft tokens] + full text prompt  (compresses nothing; needs controls)

Every prompt is built from separately tokenized pieces (context, question, cue, answer: see
`GSM8KPrompt`), so the answer tokens are identical after any prefix and the question span is known
exactly. Padding may sit between the soft tokens and the text: positions come from the attention
mask, so a padded row computes exactly what the unpadded one does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lmlab.errors import ConfigError
from lmlab.eval.generation import left_pad, positions_from_mask
from lmlab.latentwire.gsm8k import GSM8KPrompt
from lmlab.latentwire.translator import BottleneckedGatedTranslator, TranslatorShape, embedding_rms_median

Mode = Literal["soft_only", "soft_plus_text"]
MODES = ("soft_only", "soft_plus_text")
IGNORE = -100


def pad_token_id(tokenizer) -> int:
    """The id that fills padding (masked out everywhere): pad, else eos, else 0."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _bos(tokenizer) -> list[int]:
    return [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]


def _right_pad(sequences: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(s) for s in sequences))
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids, mask


class PromptEncoder:
    """Tokenizes GSM8K items into every input the bridge, its losses and the evaluated systems use.

    Calling it on a list of items gives a training batch (a dict of CPU tensors), so it can serve as a
    DataLoader `collate_fn`.
    """

    def __init__(self, source_tokenizer, target_tokenizer, prompt: GSM8KPrompt, mode: Mode, num_queries: int,
                 append_eos: bool = True):
        if mode not in MODES:
            raise ConfigError(f"mode = {mode!r}: choose one of {', '.join(MODES)}")
        self.tokenizers = {"source": source_tokenizer, "target": target_tokenizer}
        self.prompt = prompt
        self.mode = mode
        self.num_queries = num_queries
        self.append_eos = append_eos
        self._context = {side: _ids(tok, prompt.context) for side, tok in self.tokenizers.items()}
        self._cue = {side: _ids(tok, prompt.cue()) for side, tok in self.tokenizers.items()}
        # Token ids of each question and answer text, per side: every epoch and every validation pass reads
        # the same items again, and one item's question is read by several inputs of a batch.
        self._memo: dict[str, dict[str, tuple[int, ...]]] = {side: {} for side in self.tokenizers}

    def _text_ids(self, side: str, text: str) -> list[int]:
        memo = self._memo[side]
        ids = memo.get(text)
        if ids is None:
            ids = memo[text] = tuple(_ids(self.tokenizers[side], text))
        return list(ids)

    def pad_id(self, side: str = "target") -> int:
        return pad_token_id(self.tokenizers[side])

    def question_ids(self, item: dict, side: str = "target") -> list[int]:
        return self._text_ids(side, self.prompt.question(item))

    def cue_ids(self, side: str = "target") -> list[int]:
        return list(self._cue[side])

    def context_ids(self, item: dict, side: str = "target") -> list[int]:
        """Everything before the answer cue except BOS: exemplars, "Question: " and the question."""
        return self._context[side] + self.question_ids(item, side)

    def text_prompt(self, item: dict, side: str = "target") -> list[int]:
        """The few-shot text prompt in one model's tokenizer: [BOS] context question cue."""
        return _bos(self.tokenizers[side]) + self.context_ids(item, side) + self._cue[side]

    def budget_prompt(self, item: dict) -> list[int]:
        """The fair compression baseline: [BOS] + the question's first K target tokens + the cue."""
        return _bos(self.tokenizers["target"]) + self.question_ids(item)[: self.num_queries] + self._cue["target"]

    def soft_head(self) -> list[int]:
        """Target tokens before the soft tokens: BOS when the target has one (as a text prompt starts)."""
        return _bos(self.tokenizers["target"])

    def student_text(self, item: dict) -> list[int]:
        """Target text after the soft tokens: the cue alone, or the whole text prompt (without BOS)."""
        if self.mode == "soft_only":
            return self.cue_ids()
        return self.context_ids(item) + self._cue["target"]

    def answer_ids(self, item: dict) -> list[int]:
        """The teacher-forced answer (" " + rationale + "#### n") and EOS, so the target learns to stop."""
        tok = self.tokenizers["target"]
        eos = [tok.eos_token_id] if self.append_eos and tok.eos_token_id is not None else []
        return self._text_ids("target", self.prompt.answer(item)) + eos

    def source_batch(self, items: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """The source reads the same text prompt as `source_text`: (ids, mask) [B, T], left-padded."""
        return left_pad([self.text_prompt(item, "source") for item in items], self.pad_id("source"))

    def training_batch(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Every tensor of a teacher-forced step; the answer sits at the right end of each sequence."""
        answers = [self.answer_ids(item) for item in items]
        pad = self.pad_id()
        source_ids, source_mask = self.source_batch(items)
        pairs = list(zip(items, answers, strict=True))
        student_ids, student_mask = left_pad([self.student_text(item) + answer for item, answer in pairs], pad)
        teacher_ids, teacher_mask = left_pad([self.text_prompt(item) + answer for item, answer in pairs], pad)
        labels, _ = left_pad(answers, IGNORE)  # [B, A]
        question_ids, question_mask = _right_pad([self.question_ids(item) for item in items], pad)
        return {
            "source_ids": source_ids, "source_mask": source_mask,
            "student_ids": student_ids, "student_mask": student_mask,
            "teacher_ids": teacher_ids, "teacher_mask": teacher_mask,
            "answer_labels": labels,
            "question_ids": question_ids, "question_mask": question_mask,
        }

    __call__ = training_batch


@dataclass
class BridgeOutput:
    soft_tokens: torch.Tensor  # [B, K, d_tgt]
    logits: torch.Tensor  # [B, A, V]: logits[:, j] predicts labels[:, j]
    labels: torch.Tensor  # [B, A]: answer token ids, IGNORE on padding


class LatentWireBridge(nn.Module):
    """Frozen source and target around a trainable translator; only the translator has requires_grad."""

    def __init__(self, source: nn.Module, target: nn.Module, translator: BottleneckedGatedTranslator,
                 encoder: PromptEncoder, source_layer: int = -1):
        super().__init__()
        self.source = source.requires_grad_(False).eval()
        self.target = target.requires_grad_(False).eval()
        self.translator = translator
        self.encoder = encoder
        layers = source.config.get_text_config().num_hidden_layers
        if not -(layers + 1) <= source_layer <= layers:
            raise ConfigError(f"source_layer = {source_layer}: the source has hidden states 0..{layers} "
                              f"(or -1..-{layers + 1} from the end)")
        self.source_layer = source_layer
        d_src = source.config.get_text_config().hidden_size
        d_tgt = target.get_input_embeddings().embedding_dim
        if translator.out_proj.out_features != d_tgt or translator.blocks[0].norm_source.weight.numel() != d_src:
            raise ConfigError(f"translator widths do not fit the models: need d_src={d_src}, d_tgt={d_tgt}; "
                              "build it with build_translator(source, target, shape)")
        if encoder.num_queries != translator.num_queries:
            raise ConfigError(f"encoder num_queries={encoder.num_queries} differs from the translator's "
                              f"{translator.num_queries}")

    def train(self, mode: bool = True) -> LatentWireBridge:
        super().train(mode)
        self.source.eval()  # frozen models never run dropout
        self.target.eval()
        return self

    @torch.no_grad()
    def source_states(self, source_ids: torch.Tensor, source_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, T, d_src] of layer `source_layer` (index into HF's hidden_states: 0 = embeddings)."""
        out = self.source.base_model(input_ids=source_ids, attention_mask=source_mask,
                                     position_ids=positions_from_mask(source_mask), output_hidden_states=True,
                                     use_cache=False)
        return out.hidden_states[self.source_layer]

    def soft_tokens(self, source_ids: torch.Tensor, source_mask: torch.Tensor) -> torch.Tensor:
        return self.translator(self.source_states(source_ids, source_mask), source_mask)  # [B, K, d_tgt]

    def student_inputs(self, soft_tokens: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
                       answer_labels: torch.Tensor | None = None):
        """Target inputs for [BOS] [soft tokens] [text]: (inputs_embeds [B, L, d], mask [B, L], labels [B, L]).

        `text_ids` [B, S] is left-padded and ends with the answer; `answer_labels` [B, A] (IGNORE on
        padding) are the labels of its last A positions. BOS, soft, prompt and padding positions get IGNORE.
        """
        embed = self.target.get_input_embeddings()
        B, K = soft_tokens.shape[:2]
        head = torch.tensor(self.encoder.soft_head(), dtype=torch.long, device=text_ids.device).expand(B, -1)
        inputs_embeds = torch.cat([embed(head), soft_tokens.to(embed.weight.dtype), embed(text_ids)], dim=1)
        prefix = head.shape[1] + K
        mask = torch.cat([torch.ones(B, prefix, dtype=text_mask.dtype, device=text_mask.device), text_mask], dim=1)
        labels = torch.full(mask.shape, IGNORE, dtype=torch.long, device=text_ids.device)
        if answer_labels is not None:
            labels[:, labels.shape[1] - answer_labels.shape[1]:] = answer_labels
        return inputs_embeds, mask, labels

    def target_logits(self, attention_mask: torch.Tensor, keep: int, *, input_ids: torch.Tensor | None = None,
                      inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, keep, V] of the last `keep` positions of a (possibly padded) target input."""
        out = self.target(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                          position_ids=positions_from_mask(attention_mask), logits_to_keep=keep, use_cache=False)
        return out.logits

    def forward(self, batch: dict[str, torch.Tensor]) -> BridgeOutput:
        """Teacher-forced student pass: soft tokens and the target's logits for each answer token."""
        soft = self.soft_tokens(batch["source_ids"], batch["source_mask"])
        A = batch["answer_labels"].shape[1]  # [B, A], right-aligned with the student text
        inputs_embeds, mask, labels = self.student_inputs(soft, batch["student_ids"], batch["student_mask"],
                                                          batch["answer_labels"])
        logits = self.target_logits(mask, A + 1, inputs_embeds=inputs_embeds)[:, :A]
        return BridgeOutput(soft_tokens=soft, logits=logits, labels=labels[:, -A:])

    @torch.no_grad()
    def teacher_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The frozen target on the TEXT prompt: logits [B, A, V] aligned with `answer_labels`."""
        A = batch["answer_labels"].shape[1]
        return self.target_logits(batch["teacher_mask"], A + 1, input_ids=batch["teacher_ids"])[:, :A]

    @torch.no_grad()
    def question_embeddings(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The target's input embeddings of the question span [B, Q, d_tgt] (mask: batch['question_mask'])."""
        return self.target.get_input_embeddings()(batch["question_ids"])

    @torch.no_grad()
    def generation_inputs(self, items: Sequence[dict], source_items: Sequence[dict] | None = None,
                          zero_soft: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs_embeds [B, L, d], mask [B, L]) to generate from, for `bridged` and its controls.

        `source_items` feeds the source other items (shuffled_source); `zero_soft` replaces the soft
        tokens with zeros (zero_prefix). The text after the soft tokens always belongs to `items`.
        """
        device = self.translator.queries.device
        source_ids, source_mask = self.encoder.source_batch(source_items if source_items is not None else items)
        soft = self.soft_tokens(source_ids.to(device), source_mask.to(device))
        if zero_soft:
            soft = torch.zeros_like(soft)
        text_ids, text_mask = left_pad([self.encoder.student_text(item) for item in items], self.encoder.pad_id())
        inputs_embeds, mask, _ = self.student_inputs(soft, text_ids.to(device), text_mask.to(device))
        return inputs_embeds, mask


def build_translator(source: nn.Module, target: nn.Module, shape: TranslatorShape) -> BottleneckedGatedTranslator:
    """A translator sized for these two models, rescaling to the target's median embedding RMS."""
    return BottleneckedGatedTranslator(
        d_src=source.config.get_text_config().hidden_size,
        d_tgt=target.get_input_embeddings().embedding_dim,
        num_queries=shape.num_queries, bottleneck=shape.bottleneck, depth=shape.depth, heads=shape.heads,
        target_embed_rms=embedding_rms_median(target),
    )
