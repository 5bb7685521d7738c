"""GSM8K prompts and answer extraction (docs/latentwire.md section 4, docs/protocol.md section 4).

Items are Hugging Face gsm8k-format dicts: `{"question": str, "answer": str}` where the answer is the
rationale ending with a line `#### <number>`. Prompts are few-shot chain of thought in the
"Question: ...\\nAnswer: ..." format; generation stops at the next "Question:" / "Q:".

Extraction never uses a regex that can backtrack: number runs are matched by one character class with
nothing after it, and signs / currency signs are read by looking at a bounded number of characters, so
every function here is linear in the length of the text (model outputs can be long and degenerate).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from lmlab.errors import DataError

ANSWER_CUE = "\nAnswer:"
QUESTION_PREFIX = "Question: "
STOP_STRINGS = ("Question:", "Q:")
EXEMPLAR_SEED = 42

_NUMBER_RUN = re.compile(r"[0-9.,]+")  # a maximal run; nothing follows it in the pattern, so no backtracking
_STRICT_MARK = re.compile(r"####[ \t]*")
_CURRENCY = "$€£"
_MINUS = "-\u2212"


# ---------------------------------------------------------------------------------------------------
# Numbers


def normalize_number(run: str) -> str | None:
    """A run of digits, commas and periods as a canonical decimal string ("1,234.50." -> "1234.5").

    Commas are thousands separators; trailing periods/commas end a sentence; trailing fractional zeros
    and leading integer zeros are dropped. Returns None when the run holds no digit or several periods.
    Plain string operations, so a 200k-digit run costs linear time (no int() digit limit, no rounding).
    """
    text = run.rstrip(".,").replace(",", "")
    if not any(c.isdigit() for c in text) or text.count(".") > 1:
        return None
    whole, _, fraction = text.partition(".")
    whole = whole.lstrip("0") or "0"
    fraction = fraction.rstrip("0")
    return f"{whole}.{fraction}" if fraction else whole


def _signed(text: str, start: int, number: str) -> str:
    """Attach a minus sign written just before `text[start]` ("-5", "-$5", "$-5"); "3-4" is not negative."""
    i = start - 1
    if i >= 0 and text[i] in _CURRENCY:
        i -= 1
    if i >= 0 and text[i] in _MINUS and not (i > 0 and text[i - 1].isalnum()) and number != "0":
        return "-" + number
    return number


def extract_strict(text: str) -> str | None:
    """The number after the first `####` that is followed by one (sign and currency signs allowed)."""
    for mark in _STRICT_MARK.finditer(text):
        pos = mark.end()
        for _ in range(2):  # at most a sign and a currency sign, in either order
            if pos < len(text) and (text[pos] in _CURRENCY or text[pos] in _MINUS):
                pos += 1
        run = _NUMBER_RUN.match(text, pos)
        number = normalize_number(run.group()) if run else None
        if number is not None:
            return _signed(text, run.start(), number)
    return None


def extract_flexible(text: str) -> str | None:
    """The last number anywhere in the text."""
    last = None
    for run in _NUMBER_RUN.finditer(text):
        number = normalize_number(run.group())
        if number is not None:
            last = (run.start(), number)
    return None if last is None else _signed(text, last[0], last[1])


def gold_answer(item: dict) -> str:
    """The normalized number after `####` in an item's answer; a DataError when it has none."""
    number = extract_strict(item["answer"])
    if number is None:
        raise DataError(f"GSM8K item has no '#### <number>' line in its answer: {item['answer'][-80:]!r}")
    return number


def cut_at_stop(text: str, stop_strings: Sequence[str] = STOP_STRINGS) -> str:
    """The output up to (not including) the first stop string: the model starting the next question."""
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
    return text[:cut]


# ---------------------------------------------------------------------------------------------------
# Prompts


def select_exemplars(train_items: Sequence[dict], n_shot: int, eval_items: Sequence[dict] = (),
                     seed: int = EXEMPLAR_SEED) -> list[dict]:
    """`n_shot` exemplars drawn with `seed` from the training items, never one whose question is evaluated."""
    evaluated = {item["question"].strip() for item in eval_items}
    pool = [item for item in train_items if item["question"].strip() not in evaluated]
    if n_shot > len(pool):
        raise DataError(f"n_shot={n_shot} exemplars requested but only {len(pool)} training items are usable; "
                        "lower n_shot or give more training items")
    return random.Random(seed).sample(pool, n_shot)


@dataclass(frozen=True)
class GSM8KPrompt:
    """A few-shot chain-of-thought prompt, split into the pieces the systems recombine.

    text prompt = context + question + cue, where context = exemplars + "Question: " and
    cue = "\\nAnswer:"; the answer the model produces (or is trained on) is " " + rationale.
    """

    exemplars: tuple[dict, ...] = ()

    @property
    def context(self) -> str:
        shots = "".join(f"{QUESTION_PREFIX}{ex['question'].strip()}{ANSWER_CUE} {ex['answer'].strip()}\n\n"
                        for ex in self.exemplars)
        return shots + QUESTION_PREFIX

    @staticmethod
    def question(item: dict) -> str:
        return item["question"].strip()

    @staticmethod
    def cue() -> str:
        return ANSWER_CUE

    @staticmethod
    def answer(item: dict) -> str:
        return " " + item["answer"].strip()

    def text(self, item: dict) -> str:
        return self.context + self.question(item) + self.cue()
