"""Loading never runs code from a file: weights and adapters load through safetensors only (a pickle payload
next to them never runs), a model's own Python code needs --trust-remote-code, YAML is parsed safely, and config
values are never executed or handed to a shell. Plus a scan of src/lmlab for the calls that would allow it."""

from __future__ import annotations

import ast
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmlab.errors import CheckpointError
from lmlab.mu import MUConfig, MUModel, load_checkpoint, save_checkpoint
from test_reliability_checkpoints import TEXT, cli, one_error_line, save_tiny_adapter, save_tiny_model

SRC = Path(__file__).resolve().parents[1] / "src" / "lmlab"


class _Payload:
    """Unpickling this creates `marker`: what a hostile checkpoint would do with a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def hostile_pickle(marker: Path) -> bytes:
    data = pickle.dumps(_Payload(marker))
    probe = marker.with_name("probe-" + marker.name)
    pickle.loads(pickle.dumps(_Payload(probe)))  # the payload is live: loading it with pickle does run it
    assert probe.exists()
    probe.unlink()
    return data


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("security") / "model")


def copy_dir(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def eval_ppl(capsys, model: Path, tmp_path: Path, *extra: str) -> tuple[int, str, str]:
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT, encoding="utf-8")
    return cli(capsys, "eval", "ppl", "--model", str(model), "--data", str(doc), "--max-length", "32", *extra)


def test_pickle_only_model_weights_are_refused_and_never_unpickled(capsys, model_dir, tmp_path):
    marker = tmp_path / "pwned"
    model = copy_dir(model_dir, tmp_path / "model")
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(hostile_pickle(marker))
    code, _, err = eval_ppl(capsys, model, tmp_path)
    assert code == 2
    assert f"{model} has only pickle weights (pytorch_model.bin); lmlab loads safetensors only" in one_error_line(err)
    assert not marker.exists()


def test_a_pickle_beside_safetensors_weights_is_ignored(capsys, model_dir, tmp_path):
    marker = tmp_path / "pwned"
    model = copy_dir(model_dir, tmp_path / "model")
    (model / "pytorch_model.bin").write_bytes(hostile_pickle(marker))
    code, out, err = eval_ppl(capsys, model, tmp_path)
    assert code == 0, err
    assert json.loads(out)["tokens"] > 0 and not marker.exists()


def test_pickle_only_adapter_is_refused_and_never_unpickled(capsys, model_dir, tmp_path):
    marker = tmp_path / "pwned"
    adapter = save_tiny_adapter(model_dir, tmp_path / "adapter")
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(hostile_pickle(marker))
    code, _, err = eval_ppl(capsys, model_dir, tmp_path, "--adapter", str(adapter))
    assert code == 2
    assert f"{adapter} holds only adapter_model.bin (pickle); lmlab loads safetensors only" in one_error_line(err)
    assert not marker.exists()


def test_mu_checkpoint_with_a_pickle_in_place_of_its_weights_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = save_checkpoint(MUModel(MUConfig(vocab_size=32, max_seq_len=16, n_layers=2)), tmp_path / "ckpt")
    (checkpoint / "model.safetensors").write_bytes(hostile_pickle(marker))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable safetensors file"):
        load_checkpoint(checkpoint)
    assert not marker.exists()


def test_model_code_runs_only_with_trust_remote_code(model_dir, tmp_path):
    """A model directory whose config.json points at its own Python code (auto_map), as hub repos can."""
    marker = tmp_path / "remote-code-ran"
    model = copy_dir(model_dir, tmp_path / "model")
    code = f"from pathlib import Path\nPath({str(marker)!r}).touch()\nfrom transformers import LlamaConfig\n" \
           "class CustomConfig(LlamaConfig):\n    model_type = 'custom-llama'\n"
    (model / "configuration_custom.py").write_text(code, encoding="utf-8")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="custom-llama", auto_map={"AutoConfig": "configuration_custom.CustomConfig"})
    (model / "config.json").write_text(json.dumps(config), encoding="utf-8")
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT, encoding="utf-8")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", "import sys; from lmlab.cli import main; print(main(sys.argv[1:]))", "eval",
               "ppl", "--model", str(model), "--data", str(doc), "--max-length", "32"]
    refused = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)
    assert refused.stdout.strip() == "2" and not marker.exists()
    line = one_error_line(refused.stderr)
    assert f"{model} needs its own Python code (auto_map in config.json)" in line and "--trust-remote-code" in line
    # The same directory with the flag: the code runs (so the refusal above is what kept it from running).
    subprocess.run([*command, "--trust-remote-code"], capture_output=True, text=True, env=env, timeout=300,
                   stdin=subprocess.DEVNULL)
    assert marker.exists()


@pytest.mark.parametrize("study", ["hylorada", "landmarks", "bucketing", "latentwire", "mu"])
def test_no_preset_turns_on_trust_remote_code(study):
    from lmlab.config import config_dir, load_config
    from lmlab.studies.runner import get_study

    config_cls = get_study(study).config_cls
    for preset in sorted((config_dir() / study).glob("*.yaml")):
        cfg = load_config(config_cls, preset)
        assert getattr(cfg, "trust_remote_code", False) is False, preset


def test_yaml_tags_that_construct_objects_are_refused_in_presets_and_overrides(capsys, tmp_path):
    marker = tmp_path / "yaml-ran"
    tag = f"!!python/object/apply:builtins.open [{str(marker)!r}, 'w']"
    yaml.unsafe_load(tag.replace("yaml-ran", "probe")).close()  # the payload is live for an unsafe loader
    assert (tmp_path / "probe").exists()

    preset = tmp_path / "evil.yaml"
    preset.write_text(f"extends: hylorada/smoke\nmodel: {tag}\n", encoding="utf-8")
    code, _, err = cli(capsys, "run", "hylorada", "--preset", str(preset), "--out", str(tmp_path / "run1"))
    assert code == 2 and f"{preset}: invalid YAML at line 2" in one_error_line(err)
    # An override's value that is not plain YAML stays a string: validated (or used as a path), never built.
    code, _, err = cli(capsys, "run", "hylorada", "--preset", "smoke", "--out", str(tmp_path / "run2"),
                       f"train.lr={tag}")
    assert code == 2 and "train.lr = \"!!python/object/apply:builtins.open" in one_error_line(err)
    assert not marker.exists()


@pytest.mark.parametrize("value", ["$(touch {m})", "`touch {m}`", "x; touch {m}", "x && touch {m} | cat"])
def test_config_values_reach_no_shell(capsys, tmp_path, value):
    marker = tmp_path / "shell-ran"
    value = value.format(m=marker)
    code, _, err = cli(capsys, "run", "mu", "--preset", "smoke", "--seeds", "1", "--out", str(tmp_path / "run"),
                       f"dataset={value}")
    assert code == 2 and f"data file {value} does not exist" in one_error_line(err)  # a path, quoted verbatim
    code, _, err = eval_ppl(capsys, Path(value), tmp_path)
    assert code == 2 and f"model directory {value} does not exist" in one_error_line(err)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------
# Source scan


# (file relative to src/lmlab, rule) -> why it is safe; each entry is one reviewed exception.
ALLOWED: dict[tuple[str, str], str] = {
    # safe_load on libyaml's parser: the loader is yaml.CSafeLoader, or yaml.SafeLoader where libyaml is missing
    ("fileio.py", "yaml.load (use yaml.safe_load)"): "parse_yaml passes a safe loader only",
}

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "marshal", "shelve", "cloudpickle"}
UNSAFE_ATTRIBUTES = {
    ("torch", "load"): "torch.load unpickles",
    ("yaml", "load"): "yaml.load (use yaml.safe_load)", ("yaml", "unsafe_load"): "yaml.unsafe_load",
    ("yaml", "full_load"): "yaml.full_load", ("yaml", "load_all"): "yaml.load_all",
    ("yaml", "Loader"): "yaml.Loader", ("yaml", "UnsafeLoader"): "yaml.UnsafeLoader",
    ("yaml", "FullLoader"): "yaml.FullLoader",
    ("os", "system"): "os.system", ("os", "popen"): "os.popen",
    ("subprocess", "getoutput"): "subprocess.getoutput (a shell)",
    ("subprocess", "getstatusoutput"): "subprocess.getstatusoutput (a shell)",
}
UNSAFE_KEYWORDS = {("shell", True): "shell=True", ("trust_remote_code", True): "trust_remote_code=True",
                   ("weights_only", False): "weights_only=False", ("allow_pickle", True): "allow_pickle=True",
                   ("use_safetensors", False): "use_safetensors=False"}
UNSAFE_BUILTINS = {"eval", "exec", "compile", "__import__"}
SUBPROCESS_CALLS = {"run", "call", "Popen", "check_call", "check_output"}


def unsafe_uses(source: str) -> list[tuple[int, str]]:
    """(line, rule) of every unsafe call in Python source: strings and comments never match (AST based)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [(node.lineno, f"import {n}") for n in names if n.split(".")[0] in UNSAFE_MODULES]
            if isinstance(node, ast.ImportFrom) and node.module in {"torch", "yaml", "os", "subprocess"}:
                found += [(node.lineno, UNSAFE_ATTRIBUTES[(node.module, a.name)]) for a in node.names
                          if (node.module, a.name) in UNSAFE_ATTRIBUTES]
        elif isinstance(node, ast.Constant) and node.value in UNSAFE_MODULES:  # importlib.import_module("pickle")
            found.append((node.lineno, f"the module name '{node.value}'"))
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if (node.value.id, node.attr) in UNSAFE_ATTRIBUTES:
                found.append((node.lineno, UNSAFE_ATTRIBUTES[(node.value.id, node.attr)]))
            if node.value.id in UNSAFE_MODULES:
                found.append((node.lineno, f"{node.value.id}.{node.attr}"))
        elif isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name) and node.func.id in UNSAFE_BUILTINS:
                found.append((node.lineno, f"{node.func.id}()"))
            for kw in node.keywords:
                if isinstance(kw.value, ast.Constant) and (kw.arg, kw.value.value) in UNSAFE_KEYWORDS:
                    found.append((node.lineno, UNSAFE_KEYWORDS[(kw.arg, kw.value.value)]))
            func = node.func
            if (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "subprocess"
                    and func.attr in SUBPROCESS_CALLS and node.args
                    and isinstance(node.args[0], (ast.Constant, ast.JoinedStr, ast.BinOp))):
                found.append((node.lineno, f"subprocess.{func.attr} with a command string"))
    return sorted(found)


def test_the_scan_finds_every_unsafe_form():
    """Not vacuous: each rule fires on code that uses it, and text in strings or comments does not fire."""
    source = """
import pickle
from yaml import unsafe_load
import os, subprocess, torch, yaml
torch.load(path)
yaml.load(text, Loader=yaml.Loader)
yaml.full_load(text)
os.system(cmd)
subprocess.run(cmd, shell=True)
subprocess.check_output(f"ls {path}")
AutoModel.from_pretrained(path, trust_remote_code=True, use_safetensors=False)
eval(text)
exec(text)
importlib.import_module("dill")
message = "pickle weights, torch.load(, shell=True, eval("  # model.eval() and yaml.load( in a comment
model.eval()
yaml.safe_load(text)
subprocess.run([sys.executable, "-m", "x"])
"""
    rules = [rule for _, rule in unsafe_uses(source)]
    assert rules.count("yaml.Loader") == 1 and "import pickle" in rules and "yaml.unsafe_load" in rules
    for rule in ("torch.load unpickles", "yaml.load (use yaml.safe_load)", "yaml.full_load", "os.system", "shell=True",
                 "subprocess.check_output with a command string", "trust_remote_code=True", "use_safetensors=False",
                 "eval()", "exec()"):
        assert rule in rules, rule
    assert "the module name 'dill'" in rules
    assert max(line for line, _ in unsafe_uses(source)) == 14  # nothing from the string, comment or safe calls


def test_source_tree_has_no_unsafe_loading_execution_or_shell_calls():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 30
    found = []
    for path in files:
        relative = str(path.relative_to(SRC))
        for line, rule in unsafe_uses(path.read_text(encoding="utf-8")):
            if (relative, rule) not in ALLOWED:
                found.append(f"{relative}:{line}: {rule}")
    assert found == []


def test_parse_yaml_is_safe_load_on_libyaml():
    """`lmlab.fileio.parse_yaml` (study.yaml) constructs no Python object from a tag and reads what safe_load reads."""
    from lmlab.fileio import dump_yaml, parse_yaml

    with pytest.raises(yaml.constructor.ConstructorError, match="python/object"):
        parse_yaml("a: !!python/object/apply:os.getcwd []")
    tree = {"study": "hylorada", "seeds": [42, 123], "nested": {"x": 1.5e-4, "none": None, "flag": True, "s": "a: b"}}
    text = dump_yaml(tree)
    assert parse_yaml(text) == yaml.safe_load(text) == tree
    assert text == yaml.safe_dump(tree, sort_keys=False)
