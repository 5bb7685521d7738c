"""Corrupt or mismatched adapters, model weights and MU checkpoints, loaded the way a user loads them
(`lmlab eval ppl --adapter`, `load_checkpoint`): exit 2 / CheckpointError with one line naming the file or
tensor, and the model is never silently wrong."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import helpers
from lmlab.cli import main
from lmlab.errors import CheckpointError
from lmlab.hylorada import HyLoRADAConfig, apply_hylorada, load_adapter, save_adapter
from lmlab.models.hf import load_causal_lm
from lmlab.mu import MUConfig, MUModel, load_checkpoint, save_checkpoint

TEXT = "the cat sat on the mat and the dog ran to the park 12 34 " * 6


def save_tiny_model(directory: Path, arch: str = "llama", width: int = 64) -> Path:
    """An untrained 2-layer model + BPE tokenizer written with save_pretrained (what users pass as --model)."""
    return helpers.save_tiny_model(directory, arch, texts=[TEXT] * 4, hidden_size=width)


def save_tiny_adapter(model_dir: Path, directory: Path) -> Path:
    """A HyLoRADA adapter (LoRA + position bias) for the model in `model_dir`, with B moved off zero."""
    model = apply_hylorada(load_causal_lm(str(model_dir)), HyLoRADAConfig(r=4, position_bias=True),
                           max_positions=64)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
    save_adapter(model, directory)
    return directory


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run `lmlab ARGS` in this process: (exit code, stdout, stderr) of the command alone (what the test printed
    before it, e.g. transformers' progress bars while it loaded a model itself, is dropped)."""
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmlab: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reliability-models")
    dirs = {"llama": save_tiny_model(root / "llama"), "llama-narrow": save_tiny_model(root / "narrow", width=32),
            "gpt2": save_tiny_model(root / "gpt2", arch="gpt2")}
    for name in list(dirs):
        dirs[f"{name}-adapter"] = save_tiny_adapter(dirs[name], root / f"{name}-adapter")
    (root / "doc.txt").write_text(TEXT, encoding="utf-8")
    dirs["doc"] = root / "doc.txt"
    return dirs


def eval_ppl(capsys, models: dict[str, Path], *extra: str) -> tuple[int, str, str]:
    return cli(capsys, "eval", "ppl", "--model", str(models["llama"]), "--data", str(models["doc"]),
               "--max-length", "32", *extra)


def edited_adapter(models: dict[str, Path], tmp_path: Path, edit) -> Path:
    directory = tmp_path / "adapter"
    shutil.copytree(models["llama-adapter"], directory)
    edit(directory)
    return directory


def test_a_good_adapter_evaluates_and_changes_the_perplexity(capsys, models):
    code, out, err = eval_ppl(capsys, models)
    assert code == 0, err
    plain = json.loads(out)
    code, out, err = eval_ppl(capsys, models, "--adapter", str(models["llama-adapter"]))
    assert code == 0, err
    adapted = json.loads(out)
    assert adapted["adapter"] == str(models["llama-adapter"]) and adapted["tokens"] == plain["tokens"]
    assert adapted["nll_sum"] != pytest.approx(plain["nll_sum"], rel=1e-6)  # the adapter was really applied


WEIGHTS = "adapter_model.safetensors"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-64])


def garble_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:24] = b"\x00" * 16  # the JSON header starts at byte 8
    path.write_bytes(bytes(data))


def lie_about_dtype(path: Path) -> None:
    """A well-formed header whose first tensor claims float64: its byte range no longer fits the data."""
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    first = next(k for k in header if k != "__metadata__")
    header[first]["dtype"] = "F64"
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + size :])


def empty(path: Path) -> None:
    path.write_bytes(b"")


CORRUPTIONS = [truncate, garble_header, lie_about_dtype, empty]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
def test_corrupt_adapter_weights_exit_2_naming_the_file(capsys, models, tmp_path, corrupt):
    adapter = edited_adapter(models, tmp_path, lambda d: corrupt(d / WEIGHTS))
    code, _, err = eval_ppl(capsys, models, "--adapter", str(adapter))
    assert code == 2
    line = one_error_line(err)
    assert f"{adapter / WEIGHTS} is not a readable safetensors file" in line and "truncated or corrupt" in line


def test_adapter_for_another_architecture_names_both_architectures(capsys, models):
    code, _, err = eval_ppl(capsys, models, "--adapter", str(models["gpt2-adapter"]))
    assert code == 2
    line = one_error_line(err)
    assert str(models["gpt2-adapter"] / "adapter_config.json") in line
    assert "'gpt2' model" in line and "'llama'" in line


def test_adapter_for_another_width_names_the_tensor_and_both_shapes(capsys, models):
    code, _, err = eval_ppl(capsys, models, "--adapter", str(models["llama-narrow-adapter"]))
    assert code == 2
    line = one_error_line(err)
    assert str(models["llama-narrow-adapter"] / WEIGHTS) in line
    assert "tensor 'model.layers.0.self_attn.q_proj.lora_A' has shape [4, 32] but the model needs [4, 64]" in line


def _edit_meta(**changes):
    def edit(directory: Path) -> None:
        meta = json.loads((directory / "adapter_config.json").read_text())
        meta.update(changes)
        (directory / "adapter_config.json").write_text(json.dumps(meta))
    return edit


@pytest.mark.parametrize(("edit", "expected"), [
    (_edit_meta(format_version=2), "has format_version 2, newer than this lmlab reads (1): upgrade lmlab"),
    (_edit_meta(format_version="1"), "has no integer format_version"),
    (_edit_meta(base_model="llama"), "'base_model' must be a JSON object"),
    (_edit_meta(max_positions="long"), "'max_positions' must be a positive integer, got 'long'"),
    (_edit_meta(config={"r": "eight"}), "r = 'eight': Input should be a valid integer"),
    (_edit_meta(format="someone-else"), "is neither a HyLoRADA adapter"),
    (lambda d: (d / "adapter_config.json").write_text("{truncated"), "is not valid JSON"),
], ids=["newer-version", "string-version", "base-not-object", "bad-max-positions", "bad-config", "foreign",
        "not-json"])
def test_damaged_or_newer_adapter_config_exits_2_naming_the_file(capsys, models, tmp_path, edit, expected):
    adapter = edited_adapter(models, tmp_path, edit)
    code, _, err = eval_ppl(capsys, models, "--adapter", str(adapter))
    assert code == 2
    line = one_error_line(err)
    assert str(adapter / "adapter_config.json") in line and expected in line


def test_a_refused_adapter_leaves_the_model_as_it_was(models):
    model = load_causal_lm(str(models["llama"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(CheckpointError, match="has shape"):
        load_adapter(model, models["llama-narrow-adapter"])
    assert not hasattr(model, "hylorada")
    after = dict(model.named_parameters())
    assert set(after) == set(before) and all(torch.equal(after[n], before[n]) for n in before)
    assert all(p.requires_grad for p in after.values())  # not left frozen by a half-applied adapter


def test_truncated_model_weights_name_the_file(capsys, models, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(models["llama"], model_dir)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    code, _, err = cli(capsys, "eval", "ppl", "--model", str(model_dir), "--data", str(models["doc"]),
                       "--max-length", "32")
    assert code == 2
    assert "model.safetensors is not a readable safetensors file" in one_error_line(err)


def test_model_weights_missing_a_tensor_are_refused_not_randomly_initialised(capsys, models, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(models["llama"], model_dir)
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    code, _, err = cli(capsys, "eval", "ppl", "--model", str(model_dir), "--data", str(models["doc"]),
                       "--max-length", "32")
    assert code == 2
    line = one_error_line(err)
    assert "lack tensor 'model.layers.1.mlp.up_proj.weight' (1 missing)" in line and str(model_dir) in line


# ---------------------------------------------------------------------------------------------------
# MU checkpoints


@pytest.fixture
def mu_checkpoint(tmp_path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(MUModel(MUConfig(vocab_size=32, max_seq_len=16, n_layers=2)), tmp_path / "ckpt")


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
def test_corrupt_mu_checkpoint_weights_name_the_file(mu_checkpoint, corrupt):
    weights = mu_checkpoint / "model.safetensors"
    corrupt(weights)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(mu_checkpoint)
    message = str(info.value)
    assert "\n" not in message and f"{weights} is not a readable safetensors file" in message
