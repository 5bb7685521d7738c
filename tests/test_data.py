"""Data: built-in generators, local and saved sources with readable errors, the BPE tokenizer, batching."""

from __future__ import annotations

import json
import operator
import random
import re
import time

import pytest

from lmlab.data import generators
from lmlab.data.batching import chunk_examples, packed_examples, recall_examples, tokenize_documents
from lmlab.data.sources import index_split, load_documents, load_qa_items, wikitext_articles
from lmlab.errors import DataError

# ---------------------------------------------------------------------------------------------------
# Generators


def test_long_documents_are_deterministic_for_a_seed_and_differ_across_seeds():
    first = generators.long_documents(seed=3, n=4, target_length=150, num_facts=3)
    again = generators.long_documents(seed=3, n=4, target_length=150, num_facts=3)
    other = generators.long_documents(seed=4, n=4, target_length=150, num_facts=3)
    assert [(d.text, d.facts) for d in first] == [(d.text, d.facts) for d in again]
    assert [d.text for d in first] != [d.text for d in other]
    assert len({d.text for d in first}) == 4  # documents within a set differ too


def test_corpus_documents_are_deterministic_for_a_seed_and_differ_across_seeds():
    assert generators.corpus_documents(1, 5) == generators.corpus_documents(1, 5)
    assert generators.corpus_documents(1, 5) != generators.corpus_documents(2, 5)


@pytest.mark.parametrize("num_facts", [1, 4, 9])
def test_planted_facts_sit_at_their_recorded_offsets(num_facts):
    for doc in generators.long_documents(seed=11, n=6, target_length=300, num_facts=num_facts):
        assert len(doc.facts) == num_facts
        assert len({f.key for f in doc.facts}) == num_facts
        for fact in doc.facts:
            sentence = generators.fact_sentence(fact.kind, fact.key, fact.value)
            assert doc.text[fact.fact_offset:fact.fact_offset + len(sentence)] == sentence
            query = generators.query_prefix(fact.kind, fact.key)
            assert doc.text[fact.query_offset:fact.query_offset + len(query)] == query
            assert doc.text[fact.answer_offset:].startswith(fact.value + " .")
            assert doc.text[fact.answer_offset - 1] == " "  # the prompt ends right before the value
            assert fact.value.isdigit() and len(fact.value) == 4
            assert fact.fact_offset < fact.query_offset < fact.answer_offset
            assert 0.0 <= fact.depth < 1.0
        # The fact sentence occurs once (a second copy would make the recorded depth ambiguous).
        for fact in doc.facts:
            assert doc.text.count(generators.fact_sentence(fact.kind, fact.key, fact.value)) == 1
        by_offset = sorted(doc.facts, key=lambda f: f.fact_offset)
        depths = [f.depth for f in by_offset]
        assert depths == sorted(depths) and len(set(depths)) == num_facts
        # Queries come after the whole body, so every fact precedes every query.
        assert max(f.fact_offset for f in doc.facts) < min(f.query_offset for f in doc.facts)


def test_fact_depths_cover_the_document_across_a_data_set():
    depths = [f.depth for d in generators.long_documents(seed=0, n=40, target_length=200, num_facts=3)
              for f in d.facts]
    deciles = {min(9, int(d * 10)) for d in depths}
    assert deciles >= set(range(9))  # stratified over [0, 0.9)


def test_long_document_sized_in_tokens_lands_near_the_target(bpe_tokenizer):
    def token_count(text: str) -> int:
        return len(bpe_tokenizer.encode(text, add_special_tokens=False))

    rng = random.Random(5)
    for target in (250, 400):
        for _ in range(4):
            doc = generators.long_document(rng, target, num_facts=3, length_fn=token_count)
            assert abs(token_count(doc.text) - target) <= 0.15 * target
            # Sized in words instead, the same target is far more tokens: the length function matters.
            words = generators.long_document(rng, target, num_facts=3)
            assert abs(generators.word_count(words.text) - target) <= 0.15 * target
            assert token_count(words.text) > 1.3 * target


_EQUATION = re.compile(r"\$?(\d+) ([-+*/]) \$?(\d+) = \$?(\d+)")
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def test_arithmetic_answer_equals_the_recomputed_last_equation():
    items = generators.arithmetic_problems("train", 300, seed=1) + generators.arithmetic_problems("test", 100, seed=1)
    for item in items:
        rationale, final = item["answer"].rsplit("\n", 1)
        assert final.startswith("#### ")
        equations = _EQUATION.findall(rationale)
        assert equations, item
        for a, op, b, stated in equations:
            assert _OPS[op](int(a), int(b)) == int(stated), item
        a, op, b, _ = equations[-1]
        assert int(final[len("#### "):]) == _OPS[op](int(a), int(b))
        # Every number the rationale starts from appears in the question (no invented inputs).
        assert all(x in re.findall(r"\d+", item["question"]) for x in re.findall(r"\d+", rationale.split("=")[0]))


def test_arithmetic_train_and_test_questions_are_disjoint_for_any_seeds():
    train = {it["question"] for s in (0, 1) for it in generators.arithmetic_problems("train", 400, seed=s)}
    test = {it["question"] for s in (0, 2) for it in generators.arithmetic_problems("test", 150, seed=s)}
    assert len(test) > 150 and not train & test


def test_arithmetic_problems_are_reproducible_and_distinct():
    items = generators.arithmetic_problems("test", 50, seed=3)
    assert items == generators.arithmetic_problems("test", 50, seed=3)
    assert items != generators.arithmetic_problems("test", 50, seed=4)
    assert len({it["question"] for it in items}) == 50
    with pytest.raises(ValueError, match="split"):
        generators.arithmetic_problems("validation", 3)


# ---------------------------------------------------------------------------------------------------
# Local sources


def test_directory_with_split_files_loads_each_split(tmp_path):
    (tmp_path / "train.txt").write_text("first training document\n\nsecond training document\n", encoding="utf-8")
    (tmp_path / "validation.txt").write_text("a validation document", encoding="utf-8")
    (tmp_path / "test.jsonl").write_text('{"text": "test one"}\n\n{"text": "test two"}\n', encoding="utf-8")
    assert load_documents(str(tmp_path), "train") == ["first training document\n\nsecond training document\n"]
    assert load_documents(str(tmp_path), "train", txt_documents="blank_line") == [
        "first training document", "second training document"]
    assert load_documents(str(tmp_path), "validation") == ["a validation document"]
    assert load_documents(str(tmp_path), "test") == ["test one", "test two"]


def test_directory_missing_one_split_file_is_an_error_not_a_resplit_of_train(tmp_path):
    (tmp_path / "train.txt").write_text("\n\n".join(f"train doc {i}" for i in range(12)), encoding="utf-8")
    (tmp_path / "validation.txt").write_text("validation doc", encoding="utf-8")
    with pytest.raises(DataError, match="test"):
        load_documents(str(tmp_path), "test", txt_documents="blank_line")


def test_directory_with_split_subdirectories_and_valid_alias(tmp_path):
    for split, names in (("train", ["b.txt", "a.txt"]), ("valid", ["v.txt"]), ("test", ["t.txt"])):
        (tmp_path / split).mkdir()
        for name in names:
            (tmp_path / split / name).write_text(f"{split} {name}", encoding="utf-8")
    assert load_documents(str(tmp_path), "train") == ["train a.txt", "train b.txt"]
    assert load_documents(str(tmp_path), "validation") == ["valid v.txt"]
    assert load_documents(str(tmp_path), "test") == ["test t.txt"]


def test_single_file_of_blank_line_documents_is_split_by_index(tmp_path):
    docs = [f"document number {i}\nwith a second line" for i in range(25)]
    path = tmp_path / "all.txt"
    path.write_text("\n\n  \n".join(docs) + "\n", encoding="utf-8")
    splits = {s: load_documents(str(path), s, txt_documents="blank_line") for s in ("train", "validation", "test")}
    assert splits["validation"] == [docs[i] for i in range(25) if i % 10 == 8]
    assert splits["test"] == [docs[i] for i in range(25) if i % 10 == 9]
    assert sorted(sum(splits.values(), [])) == sorted(docs)


def test_glob_of_files_one_document_each(tmp_path):
    for i in range(12):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"text {i:02d}", encoding="utf-8")
    train = load_documents(str(tmp_path / "doc*.txt"), "train")
    assert train == [f"text {i:02d}" for i in range(12) if i % 10 < 8]


def test_jsonl_question_answer_rows_become_documents_and_items(tmp_path):
    rows = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(3)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    (tmp_path / "test.jsonl").write_text(json.dumps(rows[0]), encoding="utf-8")
    assert load_qa_items(str(tmp_path), "train") == rows
    assert load_documents(str(tmp_path), "train") == [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows]


def test_malformed_jsonl_names_the_line_number(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "broken\n{"text": "fine"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 3: not valid JSON"):
        load_documents(str(tmp_path), "train")
    path.write_text('{"text": "fine"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2: expected a JSON object"):
        load_documents(str(tmp_path), "train")
    path.write_text('{"text": "fine"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2: no 'text' field"):
        load_documents(str(tmp_path), "train")


def test_non_utf8_file_is_a_data_error_naming_the_byte(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(DataError, match=r"not UTF-8 .*0xe9 at offset 3"):
        load_documents(str(path), "train")


def test_empty_file_is_a_data_error(tmp_path):
    (tmp_path / "train.txt").write_text("  \n\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        load_documents(str(tmp_path), "train")


def test_missing_file_and_unmatched_glob_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_documents(str(tmp_path / "nope.txt"), "train")
    with pytest.raises(DataError, match="no data files match"):
        load_documents(str(tmp_path / "nothing*.txt"), "train")
    with pytest.raises(DataError, match="unknown split"):
        load_documents(str(tmp_path), "dev")


@pytest.mark.parametrize("n", [3, 5, 9])
def test_few_documents_split_into_disjoint_train_validation_test(n):
    records = [f"doc {i}" for i in range(n)]
    splits = {s: index_split(records, s, source="x") for s in ("train", "validation", "test")}
    assert splits == {"train": records[:-2], "validation": records[-2:-1], "test": records[-1:]}


def test_jsonl_field_errors_name_the_file_line_after_blank_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "fine"}\n\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 3: no 'text' field"):
        load_documents(str(tmp_path), "train")


def test_too_few_documents_to_split_is_a_data_error(tmp_path):
    path = tmp_path / "two.txt"
    path.write_text("one\n\ntwo\n", encoding="utf-8")
    with pytest.raises(DataError, match="cannot be split"):
        load_documents(str(path), "train", txt_documents="blank_line")


def test_save_to_disk_directory_loads_documents_and_items(tmp_path):
    import datasets

    text = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["alpha doc", "", "beta doc"]}),
        "validation": datasets.Dataset.from_dict({"text": ["gamma doc"]}),
    })
    text.save_to_disk(str(tmp_path / "text"))
    assert load_documents(str(tmp_path / "text"), "train") == ["alpha doc", "beta doc"]
    assert load_documents(str(tmp_path / "text"), "validation") == ["gamma doc"]
    with pytest.raises(DataError, match="no 'test' split"):
        load_documents(str(tmp_path / "text"), "test")
    rows = {"question": ["q1", "q2"], "answer": ["#### 1", "#### 2"]}
    qa = datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)})
    qa.save_to_disk(str(tmp_path / "qa"))
    assert load_qa_items(str(tmp_path / "qa"), "test") == [{"question": "q1", "answer": "#### 1"},
                                                          {"question": "q2", "answer": "#### 2"}]


def test_wikitext_articles_start_at_single_equals_headings():
    lines = [
        " = Valkyria Chronicles = \n", " \n", " Senjo no Valkyria is a game . \n",
        " = = Gameplay = = \n", " The game is tactical . \n",
        " = Tower Building = \n", " It is tall . \n",
        " = = = History = = = \n", " Built in 1900 . \n",
    ]
    articles = wikitext_articles(lines)
    assert len(articles) == 2
    assert articles[0].startswith("= Valkyria Chronicles =") and "= = Gameplay = =" in articles[0]
    assert articles[0].endswith("The game is tactical .")
    assert articles[1].startswith("= Tower Building =") and articles[1].endswith("Built in 1900 .")


def test_hub_dataset_offline_and_uncached_fails_fast_with_one_line(hub_offline):
    started = time.perf_counter()
    with pytest.raises(DataError) as info:
        load_documents("wikitext-2-raw-v1", "test")
    elapsed = time.perf_counter() - started
    message = str(info.value)
    assert elapsed < 15
    assert "\n" not in message and "offline" in message and "wikitext-2-raw-v1" in message
    assert "dataset=builtin" in message  # names the offline alternative


# ---------------------------------------------------------------------------------------------------
# Tokenizer and batching


def test_every_digit_is_its_own_token(bpe_tokenizer):
    for number in ("7", "42", "7291", "1000000", "31415926"):
        text = f"the code of ORION is {number} . He spends ${number}."
        pieces = [bpe_tokenizer.decode([i]) for i in bpe_tokenizer.encode(text, add_special_tokens=False)]
        digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
        # One digit per token (a leading space may ride along with the first digit of a number).
        assert all(len(p.lstrip(" ")) == 1 for p in digit_pieces), pieces
        assert "".join(p.lstrip(" ") for p in digit_pieces) == number * 2


def test_decode_inverts_encode_on_generated_text(bpe_tokenizer):
    texts = generators.corpus_documents(9, 3) + [d.text for d in generators.long_documents(9, 3, 120)]
    texts += [f"Question: {it['question']}\nAnswer: {it['answer']}" for it in generators.arithmetic_problems("test", 5)]
    texts += ["  leading spaces, tabs\tand unicode: caf\u00e9 \u2014 \u00fcber 12.5%\n"]
    for text in texts:
        ids = bpe_tokenizer.encode(text, add_special_tokens=False)
        assert bpe_tokenizer.decode(ids) == text
    assert tokenize_documents(texts, bpe_tokenizer) == [bpe_tokenizer.encode(t, add_special_tokens=False)
                                                        for t in texts]


def test_tokenizer_has_distinct_special_tokens_and_saves(bpe_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    ids = {bpe_tokenizer.pad_token_id, bpe_tokenizer.bos_token_id, bpe_tokenizer.eos_token_id}
    assert len(ids) == 3 and len(bpe_tokenizer) <= 384
    bpe_tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "remember that the key of VEGA is 9120 ."
    assert loaded.encode(text, add_special_tokens=False) == bpe_tokenizer.encode(text, add_special_tokens=False)
    assert loaded.bos_token_id == bpe_tokenizer.bos_token_id


@pytest.mark.parametrize("end_id", [None, 2])
@pytest.mark.parametrize("seq_len", [2, 5, 8])
def test_chunk_examples_cut_each_document_with_its_prefix(seq_len, end_id):
    docs = [list(range(10, 10 + n)) for n in (0, 1, 4, 7, 8, 15, 16)]
    examples = chunk_examples(docs, seq_len, prefix_id=1, end_id=end_id)
    rebuilt: list[int] = []
    expected: list[int] = []
    for tokens in docs:
        seq = [1, *tokens, *([] if end_id is None else [end_id])]
        n_full, rest = divmod(len(seq), seq_len)
        kept = seq[:n_full * seq_len] + (seq[n_full * seq_len:] if rest >= 2 else [])
        expected += kept
    for ex in examples:
        assert 2 <= len(ex["input_ids"]) <= seq_len
        rebuilt += ex["input_ids"]
    assert rebuilt == expected
    # Each non-empty document starts one example with its prefix; no example crosses into the next document.
    assert sum(ex["input_ids"][0] == 1 for ex in examples) == sum(1 for tokens in docs if tokens or end_id)
    assert all(1 not in ex["input_ids"][1:] for ex in examples)


def test_packed_examples_are_full_blocks_of_the_separated_stream():
    docs = [list(range(10, 10 + n)) for n in (3, 9, 1, 12)]
    stream = [t for tokens in docs for t in (2, *tokens)]
    for seq_len in (4, 7, 29, 30):
        blocks = packed_examples(docs, seq_len, separator_id=2)
        assert len(blocks) == len(stream) // seq_len
        assert all(len(b["input_ids"]) == seq_len for b in blocks)
        assert sum((b["input_ids"] for b in blocks), []) == stream[:len(blocks) * seq_len]


def test_recall_examples_put_only_the_recalled_values_in_the_loss(bpe_tokenizer):
    rng = random.Random(3)
    docs = [generators.long_document(rng, 60, num_facts=2, value_digits=3) for _ in range(6)]
    examples = recall_examples(docs, bpe_tokenizer, 256, prefix_id=1)
    assert len(examples) == len(docs)
    for doc, ex in zip(docs, examples, strict=True):
        ids, labels = ex["input_ids"], ex["labels"]
        assert ids[0] == 1 and labels[0] == -100 and len(ids) == len(labels)
        assert ids[1:] == bpe_tokenizer.encode(doc.text, add_special_tokens=False)
        scored = [(i, t) for i, t in enumerate(labels) if t != -100]
        assert all(ids[i] == t for i, t in scored)  # a label is the token at its own position
        # Independent: the digits decoded from the labelled tokens, in order, are the queried values.
        recalled = "".join(bpe_tokenizer.decode([t for _, t in scored]).split())
        assert recalled == "".join(f.value for f in sorted(doc.facts, key=lambda f: f.answer_offset))
    cut = recall_examples(docs, bpe_tokenizer, 8, prefix_id=1)  # queries cut off: no example without a value
    assert cut == []


def test_weighted_recall_examples_keep_every_token_and_weigh_the_values(bpe_tokenizer):
    rng = random.Random(4)
    docs = [generators.long_document(rng, 60, num_facts=1, value_digits=1) for _ in range(4)]
    plain = recall_examples(docs, bpe_tokenizer, 256, prefix_id=1)
    weighted = recall_examples(docs, bpe_tokenizer, 256, prefix_id=1, end_id=2, value_weight=30.0)
    for only, ex in zip(plain, weighted, strict=True):
        assert ex["input_ids"] == [*only["input_ids"], 2] and "labels" not in ex
        assert [w == 30.0 for w in ex["loss_weights"]] == [t != -100 for t in only["labels"]] + [False]
        assert set(ex["loss_weights"]) == {1.0, 30.0}
