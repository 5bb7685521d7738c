"""Bad inputs through the command line: missing, empty, non-UTF-8 and malformed data files, model directories
without weights or tokenizer, and hub names while offline. Each is exit 2 with one line naming the file and
the fix, before any training starts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_reliability_checkpoints import TEXT, cli, one_error_line, save_tiny_model


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def split_dir(root: Path, train: str) -> Path:
    """A local data directory with train/validation/test JSONL files; `train` is the train file's text."""
    write(root / "train.jsonl", train)
    write(root / "validation.jsonl", '{"text": "the cat sat"}\n')
    write(root / "test.jsonl", '{"text": "the dog ran"}\n')
    return root


BAD_DATA = {
    # name: (make the data set under a directory, what the one-line error must say)
    "missing-file": (lambda d: d / "nowhere.txt", "data file {d}/nowhere.txt does not exist"),
    "empty-file": (lambda d: write(d / "empty.txt", " \n\n"), "data file {d}/empty.txt is empty"),
    "latin-1-file": (lambda d: write(d / "latin.txt", "caf\xe9 au lait ".encode("latin-1") * 20),
                     "{d}/latin.txt is not UTF-8 text (byte 0xe9 at offset 3); convert it, e.g. iconv"),
    "malformed-jsonl": (lambda d: split_dir(d / "data", '{"text": "a b c"}\n\n{"text": "d e f"\n'),
                        "{d}/data/train.jsonl line 3: not valid JSON"),
    "jsonl-without-text": (lambda d: split_dir(d / "data", '{"text": "a b c"}\n{"body": "d e f"}\n'),
                           "{d}/data/train.jsonl line 2: no 'text' field"),
    "jsonl-not-an-object": (lambda d: split_dir(d / "data", '{"text": "a b c"}\n["d e f"]\n'),
                            "{d}/data/train.jsonl line 2: expected a JSON object, got list"),
    "split-missing": (lambda d: write(d / "data" / "train.txt", TEXT).parent,
                      "data directory {d}/data has train files but no 'validation' file"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_file_stops_a_study_before_training_with_one_line(capsys, tmp_path, case):
    make, expected = BAD_DATA[case]
    dataset = make(tmp_path)
    out = tmp_path / "run"
    code, _, err = cli(capsys, "run", "mu", "--preset", "smoke", "--seeds", "1", "--quiet", "--out", str(out),
                       f"dataset={dataset}")
    assert code == 2
    assert expected.format(d=tmp_path) in one_error_line(err)
    assert not (out / "results.jsonl").exists()  # no cell ran


@pytest.mark.parametrize("case", ["missing-file", "empty-file", "latin-1-file"])
def test_bad_data_file_for_eval_ppl_exits_2_naming_it(capsys, tmp_path, case):
    make, expected = BAD_DATA[case]
    model = save_tiny_model(tmp_path / "model")
    good = write(tmp_path / "good.txt", TEXT)
    code, out, err = cli(capsys, "eval", "ppl", "--model", str(model), "--data", str(good), str(make(tmp_path)),
                         "--max-length", "32")
    assert code == 2 and out == ""
    assert expected.format(d=tmp_path) in one_error_line(err)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("inputs-model") / "model")


def test_model_directory_without_weights_exits_2_for_eval_and_for_a_study(capsys, model_dir, tmp_path):
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (config_only / name).write_bytes((model_dir / name).read_bytes())
    doc = write(tmp_path / "doc.txt", TEXT)
    expected = f"{config_only} has no model weights (*.safetensors); it holds only a config"
    code, _, err = cli(capsys, "eval", "ppl", "--model", str(config_only), "--data", str(doc), "--max-length", "32")
    assert code == 2 and expected in one_error_line(err)
    out = tmp_path / "run"
    code, _, err = cli(capsys, "run", "hylorada", "--preset", "smoke", "--seeds", "1", "--quiet", "--out", str(out),
                       f"model={config_only}", "max_length=64")
    assert code == 2 and expected in one_error_line(err)
    assert not (out / "results.jsonl").exists()


def test_model_directory_with_a_broken_config_or_no_tokenizer_exits_2(capsys, model_dir, tmp_path):
    doc = write(tmp_path / "doc.txt", TEXT)
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in model_dir.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    (broken / "config.json").write_text('{"model_type": "llama",', encoding="utf-8")
    code, _, err = cli(capsys, "eval", "ppl", "--model", str(broken), "--data", str(doc), "--max-length", "32")
    assert code == 2 and f"{broken}: unusable config.json" in one_error_line(err)

    (broken / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    for path in broken.glob("tokenizer*"):
        path.unlink()
    code, _, err = cli(capsys, "eval", "ppl", "--model", str(broken), "--data", str(doc), "--max-length", "32")
    assert code == 2
    assert f"{broken} has no tokenizer files" in one_error_line(err) and "save_pretrained" in err


def test_uncached_hub_model_while_offline_exits_2_fast_naming_the_local_alternative(capsys, hub_offline, tmp_path):
    doc = write(tmp_path / "doc.txt", TEXT)
    started = time.perf_counter()
    code, _, err = cli(capsys, "eval", "ppl", "--model", "lmlab-tests/not-a-cached-model", "--data", str(doc),
                       "--max-length", "32")
    study_code, _, study_err = cli(capsys, "run", "hylorada", "--preset", "smoke", "--quiet", "--out",
                                   str(tmp_path / "run"), "model=lmlab-tests/not-a-cached-model", "max_length=64")
    elapsed = time.perf_counter() - started
    assert code == study_code == 2 and elapsed < 20
    for line in (one_error_line(err), one_error_line(study_err)):
        assert "'lmlab-tests/not-a-cached-model' is not in the local Hugging Face cache" in line
        assert "offline" in line and "save_pretrained" in line


def test_hub_data_set_with_an_unreachable_hub_exits_2_fast_without_the_offline_flag(tmp_path):
    """The user's real situation: no HF_HUB_OFFLINE flag, an empty cache, and a hub that does not answer."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_ENDPOINT="http://127.0.0.1:9", OMP_NUM_THREADS="1")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lmlab.cli", "run", "mu", "--preset", "smoke", "--quiet", "--out",
                           str(tmp_path / "run"), "dataset=wikitext-2-raw-v1"],
                          capture_output=True, text=True, env=env, timeout=300)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc.stderr)
    assert "data set 'wikitext-2-raw-v1' is not in the local Hugging Face cache and the hub is unreachable" in line
    assert "dataset=builtin" in line and "dataset=path/to/dir" in line  # the fix
    assert elapsed < 120  # seconds, not transformers' minute of retries per file (import time dominates)
