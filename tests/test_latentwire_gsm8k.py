"""GSM8K prompts and answer extraction (LatentWire evaluation, docs/protocol.md section 4)."""

import time

import pytest

from lmlab.errors import DataError
from lmlab.latentwire.gsm8k import (
    GSM8KPrompt,
    cut_at_stop,
    extract_flexible,
    extract_strict,
    gold_answer,
    normalize_number,
    select_exemplars,
)


def make_items(n: int, offset: int = 0) -> list[dict]:
    return [{"question": f"Tom has {i + offset} apples and buys {i + 2} more. How many apples does he have?",
             "answer": f"He has {i + offset} + {i + 2} = {2 * i + offset + 2} apples.\n#### {2 * i + offset + 2}"}
            for i in range(n)]


@pytest.mark.parametrize(
    ("text", "strict", "flexible"),
    [
        ("The answer is 1,234.\n#### 1,234", "1234", "1234"),
        ("#### 1,000,000", "1000000", "1000000"),
        ("She lost 5 dollars.\n#### -5", "-5", "-5"),
        ("####-5", "-5", "-5"),
        ("The temperature fell to -3 degrees", None, "-3"),
        ("It went from 10 to -0", None, "0"),
        ("pages 3-4", None, "4"),
        ("so she pays $3.50.\n#### $3.50", "3.5", "3.5"),
        ("#### 5.00", "5", "5"),
        ("#### €12", "12", "12"),
        ("#### £0.75", "0.75", "0.75"),
        ("The loss was -$5 in total", None, "-5"),
        ("The loss was $-5", None, "-5"),
        ("#### 42.", "42", "42"),
        ("#### .5", "0.5", "0.5"),
        ("#### 007", "7", "7"),
        ("He has 5 apples and 7 pears.", None, "7"),
        ("the total is 12,", None, "12"),
        ("#### 10 and later 99", "10", "99"),
        ("#### abc 12", None, "12"),
        ("version 1.2.3", None, None),
        ("####", None, None),
        ("no numbers here", None, None),
        ("", None, None),
    ],
)
def test_extraction_normalises_numbers_and_marks_missing_as_invalid(text, strict, flexible):
    assert extract_strict(text) == strict
    assert extract_flexible(text) == flexible


def test_normalized_decimals_compare_equal():
    assert normalize_number("3.50") == normalize_number("3.5") == "3.5"
    assert normalize_number("1,200.0") == normalize_number("1200") == "1200"
    assert normalize_number("...") is None


@pytest.mark.parametrize(
    "adversarial",
    [
        "1," * 100_000,
        "$" * 200_000,
        "-" * 200_000,
        "-$" * 100_000,
        "#### " * 40_000,
        "#" * 200_000,
        "####" + " " * 199_996,
        "1." * 100_000,
        "9" * 200_000,
        "1 " * 100_000,
        ",." * 100_000,
    ],
)
def test_extraction_is_linear_on_long_adversarial_strings(adversarial):
    assert len(adversarial) >= 200_000
    start = time.perf_counter()
    extract_strict(adversarial)
    extract_flexible(adversarial)
    assert time.perf_counter() - start < 2.0  # milliseconds when linear; quadratic would take minutes


def test_extraction_keeps_every_digit_of_a_huge_number():
    assert extract_flexible("9" * 200_000) == "9" * 200_000


def test_gold_answer_reads_the_final_line_and_rejects_items_without_one():
    assert gold_answer({"question": "q", "answer": "5 * 2 = 10\n#### 1,010"}) == "1010"
    with pytest.raises(DataError, match="####"):
        gold_answer({"question": "q", "answer": "no final answer"})


def test_exemplars_never_include_evaluation_items_and_depend_only_on_the_seed():
    train = make_items(12)
    evaluated = train[:4] + make_items(3, offset=100)  # four evaluation questions also sit in the train split
    shots = select_exemplars(train, 6, eval_items=evaluated)
    questions = {item["question"] for item in evaluated}
    assert len(shots) == 6
    assert not any(shot["question"] in questions for shot in shots)
    assert shots == select_exemplars(train, 6, eval_items=evaluated)  # seed 42 by default
    assert select_exemplars(train, 8, eval_items=evaluated, seed=1) == select_exemplars(
        list(train), 8, eval_items=evaluated, seed=1)
    assert [s["question"] for s in select_exemplars(train, 8, eval_items=evaluated, seed=1)] != [
        s["question"] for s in select_exemplars(train, 8, eval_items=evaluated, seed=2)]
    with pytest.raises(DataError, match="n_shot=9"):
        select_exemplars(train, 9, eval_items=evaluated)


def test_prompt_is_few_shot_question_answer_format():
    shot, item = make_items(2)
    prompt = GSM8KPrompt(exemplars=(shot,))
    expected = (f"Question: {shot['question']}\nAnswer: {shot['answer']}\n\n"
                f"Question: {item['question']}\nAnswer:")
    assert prompt.text(item) == expected
    assert prompt.context + prompt.question(item) + prompt.cue() == expected
    assert prompt.answer(item) == " " + item["answer"]
    assert GSM8KPrompt().text(item) == f"Question: {item['question']}\nAnswer:"


def test_output_is_cut_at_the_next_question():
    assert cut_at_stop(" 3 + 4 = 7\n#### 7\n\nQuestion: Next one") == " 3 + 4 = 7\n#### 7\n\n"
    assert cut_at_stop(" 7\nQ: more") == " 7\n"
    assert cut_at_stop(" 7") == " 7"
