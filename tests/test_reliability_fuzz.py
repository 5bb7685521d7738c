"""Property-based fuzzing (hypothesis, bounded examples): config parsing and `key=value` overrides through the
command line, GSM8K answer extraction (never crashes, canonical numbers, linear time), and position buckets
over any position."""

from __future__ import annotations

import bisect
import re
import time
from decimal import Decimal

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lmlab.config import load_config, preset_path, valid_keys
from lmlab.errors import ConfigError, DataError
from lmlab.hylorada.position import LearnableBuckets, bucket_edges, bucketize
from lmlab.latentwire.gsm8k import cut_at_stop, extract_flexible, extract_strict, gold_answer, normalize_number
from lmlab.studies.runner import get_study
from test_reliability_checkpoints import cli

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# ---------------------------------------------------------------------------------------------------
# Configs and overrides

TRICKY_VALUES = ["", "null", "~", "None", "true", "no", "[a, b]", "[]", "{}", "{r: 3}", "{rr: 3}", ".inf", "-.inf",
                 ".nan", "1e999", "-0", "0x1f", "1_000", "2024-01-01", "'unterminated", "[unclosed", "&a [*a]",
                 "[" * 3000, "- a\n- b", "!!python/object/apply:os.system ['true']", "!!binary aGk=", "!!set {a}",
                 "a: b: c", "key=value", "\x00", "\t", "é", "1" * 500]


def values() -> st.SearchStrategy[str]:
    scalars = st.one_of(st.sampled_from(TRICKY_VALUES), st.text(max_size=30), st.integers().map(str),
                        st.floats().map(repr))
    return st.one_of(scalars, st.lists(scalars, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"))


def overrides(study: str) -> st.SearchStrategy[list[str]]:
    config_cls = get_study(study).config_cls
    known = st.sampled_from(valid_keys(config_cls) + list(config_cls.ALIASES))
    unknown = st.text(alphabet=st.characters(blacklist_characters="="), max_size=20)
    keys = st.one_of(known, known, known, unknown)  # mostly real keys, so values get validated too
    item = st.tuples(keys, values()).map(lambda kv: f"{kv[0]}={kv[1]}")
    return st.lists(item.filter(lambda s: not s.startswith("-")), min_size=1, max_size=3)


@pytest.mark.parametrize("study", ["hylorada", "mu"])
def test_any_overrides_exit_2_with_one_line_or_reach_the_output_check(capsys, tmp_path, study):
    """Every override list either fails validation with one line or validates; a valid config then stops at
    the output check (--out is a file), so nothing trains. Never a traceback, never another exit code."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")

    @FUZZ
    @given(items=overrides(study))
    def run(items: list[str]) -> None:
        code, out, err = cli(capsys, "run", study, "--preset", "smoke", "--out", str(blocker), *items)
        assert code == 2 and out == "", (items, err)
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("lmlab: error: ") and "Traceback" not in err, (items, err)
        try:
            load_config(get_study(study).config_cls, preset_path(study, "smoke"), items)
        except ConfigError as exc:  # the CLI shows exactly the config's own error
            shown = " ".join(str(exc).splitlines()).encode("utf-8", "backslashreplace").decode("utf-8")
            assert lines[0] == "lmlab: error: " + shown
            return
        # A valid config stops later: at the configuration list (`only=`), at the cells' workers (`parallel=N`
        # beyond this machine's cores or GPUs) or at the output check.
        assert "names no configuration" in err or "is a file, not a directory" in err or re.search(
            r"parallel=\d+ needs \d+ (CPU cores|GPUs)", err), (items, err)

    run()


def yaml_documents() -> st.SearchStrategy[str]:
    import yaml

    leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
                       st.sampled_from(TRICKY_VALUES))
    keys = st.one_of(st.sampled_from(["train", "adapter", "lr", "r", "only", "seeds", "model", "extends", "epochs",
                                      "num_train", "max_length", "dataset"]), st.text(max_size=8))
    trees = st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                          st.dictionaries(keys, inner, max_size=3)), max_leaves=8)
    documents = st.dictionaries(keys, trees, max_size=4).map(lambda d: yaml.safe_dump(d, allow_unicode=True))
    return st.one_of(documents, st.text(max_size=200), st.sampled_from(TRICKY_VALUES))


@FUZZ
@given(text=yaml_documents())
def test_any_preset_file_loads_or_raises_one_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "preset.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    config_cls = get_study("hylorada").config_cls
    try:
        cfg = load_config(config_cls, path)
    except ConfigError as exc:
        assert str(path) in str(exc) or "config file" in str(exc), str(exc)  # names the file it could not use
        return
    assert config_cls.model_validate(cfg.model_dump(mode="json")) == cfg  # what study.yaml stores reloads


# ---------------------------------------------------------------------------------------------------
# GSM8K answer extraction

CANONICAL = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]*[1-9])?")
NUMBERISH = st.text(alphabet="0123456789.,-$#€\u2212 \t\nx:", max_size=60)
ANY_TEXT = st.one_of(st.text(max_size=200), NUMBERISH)


@FUZZ
@given(text=ANY_TEXT)
def test_extraction_never_crashes_and_returns_canonical_numbers(text):
    for answer in (extract_strict(text), extract_flexible(text)):
        assert answer is None or CANONICAL.fullmatch(answer), answer
    assert text.startswith(cut_at_stop(text))
    if extract_strict(text) is not None:
        assert "####" in text


@FUZZ
@given(run=st.text(alphabet="0123456789.,", max_size=40))
def test_normalize_number_agrees_with_decimal(run):
    number = normalize_number(run)
    cleaned = run.rstrip(".,").replace(",", "")
    if not any(c.isdigit() for c in cleaned) or cleaned.count(".") > 1:
        assert number is None
        return
    assert CANONICAL.fullmatch(number) and Decimal(number) == Decimal(cleaned)
    assert normalize_number(number) == number


@FUZZ
@given(text=ANY_TEXT, n=st.integers(min_value=0, max_value=10**30))
def test_flexible_reads_the_last_number_written(text, n):
    assert extract_flexible(f"{text} {n:,}") == str(n)


@FUZZ
@given(text=ANY_TEXT, n=st.integers(min_value=-10**12, max_value=10**12), cents=st.integers(0, 99))
def test_strict_reads_the_number_after_the_first_mark(text, n, cents):
    assume("####" not in text and not text.endswith("#"))
    written = f"{n:,}.{cents:02d}"
    expected = Decimal(f"{n}.{cents:02d}") if n >= 0 else Decimal(f"{n}") - Decimal(f"0.{cents:02d}")
    answer = extract_strict(f"{text}\n#### {written}\nmore text #### 7")
    assert answer is not None and Decimal(answer) == expected
    assert gold_answer({"question": "q", "answer": f"{text}\n#### {written}"}) == answer


@FUZZ
@given(answer=ANY_TEXT)
def test_gold_answer_is_a_number_or_a_data_error(answer):
    try:
        assert CANONICAL.fullmatch(gold_answer({"question": "q", "answer": answer}))
    except DataError as exc:
        assert "####" in str(exc) and "\n" not in str(exc)


def _best_time(fn, text: str) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        fn(text)
        best = min(best, time.perf_counter() - start)
    return best


@settings(max_examples=12, deadline=None)
@given(unit=st.text(alphabet="0123456789.,-$#€\u2212 \tQ:", min_size=1, max_size=10))
def test_extraction_time_grows_linearly_on_repeated_adversarial_units(unit):
    """8x longer input must cost about 8x (not 64x, as a quadratic scan would), measured on any repeated unit."""
    small = unit * (20_000 // len(unit) + 1)
    large = small * 8
    for fn in (extract_strict, extract_flexible, cut_at_stop):
        t_small, t_large = _best_time(fn, small), _best_time(fn, large)
        assert t_large < 24 * t_small + 0.02, (fn.__name__, unit, t_small, t_large)


# ---------------------------------------------------------------------------------------------------
# Position buckets


bucket_shapes = st.integers(min_value=2, max_value=1 << 20).flatmap(
    lambda max_positions: st.tuples(st.integers(min_value=2, max_value=min(max_positions, 4096)),
                                    st.just(max_positions), st.sampled_from(["log", "uniform"])))


@FUZZ
@given(shape=bucket_shapes)
def test_bucket_edges_are_strictly_increasing_inside_the_context(shape):
    num_buckets, max_positions, spacing = shape
    edges = bucket_edges(num_buckets, max_positions, spacing)
    assert len(edges) == num_buckets - 1
    assert edges[0] >= 1 and edges[-1] < max_positions
    assert all(a < b for a, b in zip(edges, edges[1:], strict=False))


@FUZZ
@given(num_buckets=st.integers(-3, 40), max_positions=st.integers(-3, 40))
def test_impossible_bucket_counts_are_refused_with_a_message(num_buckets, max_positions):
    assume(not 2 <= num_buckets <= max_positions)
    with pytest.raises(ValueError, match="need 2 <= num_buckets <= max_positions"):
        bucket_edges(num_buckets, max_positions)


@FUZZ
@given(shape=bucket_shapes, data=st.data())
def test_bucketize_counts_the_edges_at_or_before_any_position(shape, data):
    num_buckets, max_positions, spacing = shape
    edges = bucket_edges(num_buckets, max_positions, spacing)
    positions = data.draw(st.lists(st.one_of(st.integers(0, max_positions - 1), st.integers(0, 1 << 40),
                                             st.sampled_from(edges)), min_size=1, max_size=20))
    buckets = bucketize(torch.tensor(positions), torch.tensor(edges)).tolist()
    assert buckets == [bisect.bisect_right(edges, p) for p in positions]
    assert all(0 <= b <= num_buckets - 1 for b in buckets)


@FUZZ
@given(shape=bucket_shapes, data=st.data())
def test_learnable_bucket_weights_are_a_distribution_at_any_position(shape, data):
    num_buckets, max_positions, spacing = shape
    edges = bucket_edges(num_buckets, max_positions, spacing)
    temperature = data.draw(st.floats(1e-3, 10.0))
    buckets = LearnableBuckets(edges, max_positions, temperature)
    positions = data.draw(st.lists(st.integers(0, 8 * max_positions), min_size=1, max_size=16))
    with torch.no_grad():
        weights = buckets(torch.tensor([positions]))  # [1, T, num_buckets]
        assert weights.shape == (1, len(positions), num_buckets)
        assert torch.isfinite(weights).all() and (weights >= -1e-6).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones(1, len(positions)), atol=1e-5, rtol=0)
        assert buckets.diversity_penalty().item() == 0.0  # boundaries at their initial gaps
        buckets.boundaries.copy_(torch.rand(num_buckets - 1, generator=torch.Generator().manual_seed(len(edges))))
        assert 0.0 <= buckets.diversity_penalty().item() <= 1.0


@FUZZ
@given(shape=bucket_shapes, data=st.data())
def test_sharp_learnable_buckets_agree_with_fixed_buckets(shape, data):
    """At a temperature far below one position, soft assignment is the fixed bucket (off the edges themselves)."""
    num_buckets, max_positions, spacing = shape
    edges = bucket_edges(num_buckets, max_positions, spacing)
    positions = data.draw(st.lists(st.integers(0, 4 * max_positions).filter(lambda p: p not in set(edges)),
                                   min_size=1, max_size=16))
    buckets = LearnableBuckets(edges, max_positions, temperature=0.01 / max_positions)
    with torch.no_grad():
        soft = buckets(torch.tensor([positions]))[0].argmax(-1).tolist()
    assert soft == [bisect.bisect_right(edges, p) for p in positions]
