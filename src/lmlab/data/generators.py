"""Built-in, deterministic data generators (docs/protocol.md section 1): no download, same output for a seed.

- `grammar_text`: filler prose from a small generated grammar. Each document has a topic (a subset of
  nouns, verbs and places it prefers) and a cast of characters, so there is local structure a small model
  can learn and document-level structure that rewards longer context.
- `long_document`: grammar text with key-value facts ("remember the code ORION 7291 .") planted at
  recorded depths and queries at the end that need them ("recall the code ORION 7291 ."). The value
  follows its key in both, so a model retrieves it by copying what followed the key earlier (an
  induction head), from wherever the fact is.
- `arithmetic_problems`: GSM8K-shaped word problems (question, step-by-step rationale, `#### <number>`)
  from templates, with a fixed train/test split.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from lmlab import progress as bars

NAMES = [
    "alice", "bruno", "carla", "dmitri", "elena", "farid", "greta", "hugo", "iris", "jonas", "kira", "leo",
    "maya", "nadia", "omar", "petra", "quinn", "rosa", "sven", "tara", "umar", "vera", "wren", "yusuf",
]
NOUNS = [
    "lamp", "river", "garden", "letter", "window", "market", "engine", "bridge", "forest", "candle", "violin",
    "harbor", "tower", "basket", "mirror", "wagon", "lantern", "meadow", "kettle", "compass", "ladder",
    "ribbon", "anchor", "blanket", "orchard", "chimney", "saddle", "feather", "pebble", "quarry", "cellar",
    "glacier", "furnace", "map", "drum", "needle", "barrel", "statue", "tunnel", "canyon",
]
ADJECTIVES = [
    "old", "quiet", "bright", "narrow", "heavy", "golden", "broken", "distant", "small", "hidden", "wooden",
    "silver", "cold", "gentle", "crooked", "dusty", "famous", "empty", "tall", "strange",
]
TRANSITIVE = [
    "repairs", "paints", "carries", "finds", "watches", "cleans", "opens", "follows", "builds", "hides",
    "measures", "sells", "draws", "guards", "polishes", "studies",
]
INTRANSITIVE = ["sleeps", "waits", "sings", "wanders", "laughs", "rests", "listens", "works", "hurries", "smiles"]
PLACES = [
    "village", "station", "library", "valley", "workshop", "island", "castle", "square", "mill", "school",
    "harbor", "farm", "theater", "museum", "camp", "temple",
]
ADVERBS = ["slowly", "carefully", "quickly", "quietly", "happily", "again", "alone", "early", "later", "often"]
TIMES = ["in the morning", "at noon", "in the evening", "at night", "on monday", "after the rain", "before dawn"]
KEYS = [
    "ORION", "VEGA", "LYRA", "ATLAS", "CYGNUS", "DRACO", "PERSEUS", "RIGEL", "SIRIUS", "ALTAIR", "CASTOR",
    "POLLUX", "ANTARES", "CAPELLA", "DENEB", "MIRA", "NOVA", "PHOENIX", "TITAN", "ZENITH", "AURORA", "BOREAS",
    "CRUX", "ELARA", "HYDRA", "IO", "KEPLER", "LUNA", "MERCURY", "NEPTUNE", "OBERON", "PANDORA",
]
FACT_KINDS = ["code", "number", "key", "room"]


@dataclass
class _Topic:
    nouns: list[str]
    verbs: list[str]
    places: list[str]
    cast: list[str]


def _topic(rng: random.Random) -> _Topic:
    return _Topic(
        nouns=rng.sample(NOUNS, 8),
        verbs=rng.sample(TRANSITIVE, 5),
        places=rng.sample(PLACES, 3),
        cast=rng.sample(NAMES, 3),
    )


def _pick(rng: random.Random, preferred: list[str], everything: list[str], p_preferred: float = 0.8) -> str:
    return rng.choice(preferred) if rng.random() < p_preferred else rng.choice(everything)


def grammar_sentence(rng: random.Random, topic: _Topic) -> str:
    """One sentence of the grammar, lower case, tokens separated by spaces, ending with ' .'."""
    name = _pick(rng, topic.cast, NAMES, 0.9)
    noun = _pick(rng, topic.nouns, NOUNS)
    adj = rng.choice(ADJECTIVES)
    place = _pick(rng, topic.places, PLACES)
    verb = _pick(rng, topic.verbs, TRANSITIVE)
    form = rng.randrange(7)
    if form == 0:
        words = [name, verb, "the", adj, noun, "near", "the", place]
    elif form == 1:
        words = ["the", adj, noun, "is", "in", "the", place]
    elif form == 2:
        words = [name, rng.choice(INTRANSITIVE), rng.choice(ADVERBS), rng.choice(TIMES)]
    elif form == 3:
        other = _pick(rng, [c for c in topic.cast if c != name] or NAMES, NAMES, 0.9)
        words = [name, "gives", "the", noun, "to", other, "and", other, rng.choice(INTRANSITIVE)]
    elif form == 4:
        words = ["in", "the", place, name, verb, "a", adj, noun, rng.choice(ADVERBS)]
    elif form == 5:
        words = ["the", noun, "of", "the", place, "is", adj, "and", rng.choice(ADJECTIVES)]
    else:
        words = [name, "says", "that", "the", noun, "is", adj]
    return " ".join(words) + " ."


REPEAT_PROBABILITY = 0.3


class _Writer:
    """Sentences of one document. Documents retell themselves: with probability REPEAT_PROBABILITY a
    sentence is one the document said before, so earlier context predicts later text (a long context
    helps, and a model learns to copy from it)."""

    def __init__(self, rng: random.Random, topic: _Topic | None = None):
        self.rng = rng
        self.topic = topic or _topic(rng)
        self.said: list[str] = []

    def sentence(self) -> str:
        if self.said and self.rng.random() < REPEAT_PROBABILITY:
            return self.rng.choice(self.said)
        sentence = grammar_sentence(self.rng, self.topic)
        self.said.append(sentence)
        return sentence


def grammar_text(rng: random.Random, num_sentences: int, topic: _Topic | None = None) -> str:
    writer = _Writer(rng, topic)
    return " ".join(writer.sentence() for _ in range(num_sentences))


def word_count(text: str) -> int:
    return len(text.split())


@dataclass
class Fact:
    """A planted key-value fact and its query. Offsets are character offsets into the document."""

    key: str
    kind: str
    value: str
    depth: float          # relative position of the fact in the document, in [0, 1)
    fact_offset: int      # where the fact sentence starts
    query_offset: int     # where the query sentence starts
    answer_offset: int    # where the value starts inside the query (the text before it is the prompt)


@dataclass
class LongDocument:
    text: str
    facts: list[Fact] = field(default_factory=list)


def fact_sentence(kind: str, key: str, value: str) -> str:
    return f"remember the {kind} {key} {value} ."


def query_prefix(kind: str, key: str) -> str:
    """The query up to its value: what a retrieval prompt ends with."""
    return f"recall the {kind} {key}"


def long_document(
    rng: random.Random,
    target_length: int,
    num_facts: int = 4,
    length_fn: Callable[[str], int] = word_count,
    value_digits: int = 4,
) -> LongDocument:
    """A document of about `target_length` units of `length_fn` (words by default, or tokens), with
    `num_facts` facts planted at stratified depths in [0, 0.9) and their queries at the end.

    Pass `length_fn=lambda s: len(tokenizer.encode(s))` to size documents in a tokenizer's tokens.
    """
    writer = _Writer(rng)
    keys = rng.sample(KEYS, num_facts)
    kinds = [rng.choice(FACT_KINDS) for _ in keys]
    values = [str(rng.randrange(10 ** (value_digits - 1), 10**value_digits)) for _ in keys]
    queries = [f"{query_prefix(k, key)} {v} ." for k, key, v in zip(kinds, keys, values, strict=True)]
    facts_text = [fact_sentence(k, key, v) for k, key, v in zip(kinds, keys, values, strict=True)]
    query_len = sum(length_fn(" " + q) for q in queries)
    body_len = max(num_facts, target_length - query_len)
    # Depths stratified over [0, 0.9) so every region of the document holds facts across a data set.
    strata = sorted(rng.sample(range(9), num_facts)) if num_facts <= 9 else sorted(rng.randrange(9) for _ in keys)
    depths = [(s + rng.random()) / 10.0 for s in strata]
    order = list(range(num_facts))
    rng.shuffle(order)  # which fact goes to which depth
    pending = sorted(zip(depths, order, strict=True))
    body = ""
    used = 0
    offsets: dict[int, int] = {}
    while used < body_len or pending:
        if pending and used >= pending[0][0] * body_len:
            idx = pending.pop(0)[1]
            sentence = facts_text[idx]
        else:
            idx, sentence = None, writer.sentence()
        if body:
            body += " "
        if idx is not None:
            offsets[idx] = len(body)
        body += sentence
        used += length_fn(" " + sentence)
    query_order = list(range(num_facts))
    rng.shuffle(query_order)
    text = body
    facts_by_idx: dict[int, Fact] = {}
    for idx in query_order:
        query_offset = len(text) + 1
        text = text + " " + queries[idx]
        answer_offset = query_offset + len(query_prefix(kinds[idx], keys[idx])) + 1
        facts_by_idx[idx] = Fact(
            key=keys[idx], kind=kinds[idx], value=values[idx], depth=offsets[idx] / max(1, len(body)),
            fact_offset=offsets[idx], query_offset=query_offset, answer_offset=answer_offset,
        )
    return LongDocument(text=text, facts=[facts_by_idx[i] for i in query_order])


def long_documents(seed: int, n: int, target_length: int, num_facts: int = 4,
                   length_fn: Callable[[str], int] = word_count, value_digits: int = 4) -> list[LongDocument]:
    rng = random.Random(f"longdoc-{seed}")
    return [long_document(rng, target_length, num_facts, length_fn, value_digits)
            for _ in bars.bar(range(n), desc=f"building documents of {target_length} tokens", unit="doc")]


def corpus_documents(seed: int, n: int, sentences_per_doc: int = 40) -> list[str]:
    """Plain grammar documents for from-scratch language modelling and tokenizer training."""
    rng = random.Random(f"corpus-{seed}")
    return [grammar_text(rng, sentences_per_doc) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------
# GSM8K-shaped arithmetic word problems

OBJECTS = ["apples", "marbles", "books", "stickers", "pencils", "cookies", "shells", "cards", "coins", "flowers",
           "eggs", "stamps", "buttons", "candles", "bottles", "oranges"]
CONTAINERS = ["boxes", "bags", "baskets", "jars", "crates", "packs"]
ITEMS_PRICED = ["notebooks", "tickets", "sandwiches", "toys", "cups", "plants", "scarves", "lamps"]
PEOPLE = [("Natalia", "she"), ("James", "he"), ("Maria", "she"), ("Tom", "he"), ("Aisha", "she"), ("Ken", "he"),
          ("Lucia", "she"), ("Omar", "he"), ("Priya", "she"), ("Diego", "he"), ("Sofia", "she"), ("Ben", "he"),
          ("Chloe", "she"), ("Ivan", "he"), ("Zara", "she"), ("Leo", "he")]


def _possessive(pronoun: str) -> str:
    return {"she": "her", "he": "his"}[pronoun]


def arithmetic_problem(rng: random.Random) -> dict:
    """One problem: {"question", "answer"} with the rationale ending in `#### <number>` (gsm8k format)."""
    name, pron = rng.choice(PEOPLE)
    other, _ = rng.choice([p for p in PEOPLE if p[0] != name])
    obj = rng.choice(OBJECTS)
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        q = f"{name} has {a} {obj}. {pron.capitalize()} buys {b} more {obj}. How many {obj} does {name} have now?"
        steps, result = [f"{name} has {a} + {b} = {a + b} {obj} now."], a + b
    elif kind == 1:
        a = rng.randint(10, 90)
        b = rng.randint(1, a - 1)
        q = f"{name} had {a} {obj} and gave {b} of them to {other}. How many {obj} does {name} have left?"
        steps, result = [f"{name} has {a} - {b} = {a - b} {obj} left."], a - b
    elif kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        box = rng.choice(CONTAINERS)
        q = f"{name} buys {a} {box} of {obj}. Each of the {box} holds {b} {obj}. How many {obj} does {name} buy?"
        steps, result = [f"{name} buys {a} * {b} = {a * b} {obj}."], a * b
    elif kind == 3:
        a, b, c = rng.randint(1, 30), rng.randint(2, 9), rng.randint(2, 9)
        box = rng.choice(CONTAINERS)
        q = (f"{name} has {a} {obj}. {pron.capitalize()} gets {b} {box} with {c} {obj} in each. "
             f"How many {obj} does {name} have in total?")
        steps = [f"The {box} hold {b} * {c} = {b * c} {obj}.",
                 f"In total {name} has {a} + {b * c} = {a + b * c} {obj}."]
        result = a + b * c
    elif kind == 4:
        b, each = rng.randint(2, 9), rng.randint(2, 12)
        a = b * each
        q = f"{name} shares {a} {obj} equally among {b} friends. How many {obj} does each friend get?"
        steps, result = [f"Each friend gets {a} / {b} = {each} {obj}."], each
    else:
        n, price = rng.randint(2, 9), rng.randint(2, 25)
        item = rng.choice(ITEMS_PRICED)
        q = f"{name} buys {n} {item} for ${price} each. How much money does {name} spend in dollars?"
        steps, result = [f"{pron.capitalize()} spends {n} * ${price} = ${n * price}."], n * price
    answer = "\n".join(steps) + f"\n#### {result}"
    return {"question": q, "answer": answer}


def arithmetic_problems(split: str, n: int, seed: int = 0) -> list[dict]:
    """`n` problems of the fixed `train` or `test` split. No test question appears in the train split:
    a problem belongs to the test split exactly when a hash of its question says so."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"arith-{split}-{seed}")
    items: list[dict] = []
    seen: set[str] = set()
    attempts = 0
    while len(items) < n:
        attempts += 1
        if attempts > 200 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct {split} problems; the template space is too small")
        item = arithmetic_problem(rng)
        q = item["question"]
        if q in seen or _is_test_question(q) != (split == "test"):
            continue
        seen.add(q)
        items.append(item)
    return items


def _is_test_question(question: str) -> bool:
    # A stable (not Python's salted hash) split by the question text: about 1 in 5 questions is test.
    h = 0
    for ch in question.encode("utf-8"):
        h = (h * 131 + ch) % 1_000_003
    return h % 5 == 0
