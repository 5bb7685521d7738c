"""LatentWire: a trained bridge from a frozen source LM to a frozen target LM through K soft tokens.

Components (docs/latentwire.md): `translator` (BottleneckedGatedTranslator), `bridge` (conditioning modes and
the target's inputs), `losses`, `gsm8k` (prompts, answer extraction), `costs` (KV bytes) and `evaluate`
(the six evaluated systems, eval_samples.jsonl, summaries). The training recipe lives in `lmlab.studies`.
"""

from lmlab.latentwire.bridge import LatentWireBridge, PromptEncoder, build_translator
from lmlab.latentwire.evaluate import SYSTEMS, evaluate_latentwire, format_eval_summary, summarize_eval
from lmlab.latentwire.gsm8k import GSM8KPrompt, extract_flexible, extract_strict, select_exemplars
from lmlab.latentwire.losses import LossWeights, bridge_loss
from lmlab.latentwire.translator import (
    BottleneckedGatedTranslator,
    TranslatorShape,
    embedding_rms_median,
    optimizer_rules,
    parameter_count,
    translator_preset,
)

__all__ = [
    "SYSTEMS",
    "BottleneckedGatedTranslator",
    "GSM8KPrompt",
    "LatentWireBridge",
    "LossWeights",
    "PromptEncoder",
    "TranslatorShape",
    "bridge_loss",
    "build_translator",
    "embedding_rms_median",
    "evaluate_latentwire",
    "extract_flexible",
    "extract_strict",
    "format_eval_summary",
    "optimizer_rules",
    "parameter_count",
    "select_exemplars",
    "summarize_eval",
    "translator_preset",
]
