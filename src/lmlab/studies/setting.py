"""A run's setting in words, for its report's `## Setting` section: the models, data, context and training that
every number of the report comes from, so that a reader compares them with the setting of a claim (the research
notes' GPT-2 on WikiText-2, say) before reading a verdict. Computed from the run's recorded configuration."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmlab.studies.pretrain import PretrainConfig

_PRETRAIN_DATA = {"longdoc": "long documents with planted facts", "arithmetic": "arithmetic word problems",
                  "corpus": "corpus documents"}


def describe_base(cfg: PretrainConfig) -> str:
    """A cached tiny base: its shape and how it was pretrained."""
    m = cfg.model
    kv = f", {plural(m.num_kv_heads, 'KV head')}" if m.arch == "llama" and m.num_kv_heads else ""
    arch = "Llama" if m.arch == "llama" else "GPT-2"
    return (f"a tiny {arch} built and pretrained here ({plural(m.num_layers, 'layer')}, width {m.hidden_size}, "
            f"{plural(m.num_heads, 'head')}{kv}, BPE vocabulary {cfg.vocab_size}, {m.context}-token "
            f"context; pretrained for {plural(cfg.train.epochs, 'epoch')} on {cfg.num_docs:,} built-in "
            f"{_PRETRAIN_DATA[cfg.data]})")


def plural(count: float, word: str) -> str:
    """'1 epoch', '2 epochs', '1.5 epochs'."""
    return f"{count:g} {word}{'' if count == 1 else 's'}"


def describe_model(name: str, base: PretrainConfig) -> str:
    """'builtin' (the cached tiny base) or a Hugging Face model id / directory."""
    return describe_base(base) if name == "builtin" else f"`{name}`"


def describe_data(name: str, builtin: str) -> str:
    return builtin if name == "builtin" else f"`{name}`"


def section(lines: list[str]) -> list[str]:
    """The report's `## Setting` section from a study's lines (nothing when it has none)."""
    if not lines:
        return []
    return ["## Setting", "", *[f"- {line}" for line in lines], ""]
