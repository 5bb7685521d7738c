"""Checkpoints: a saved best model reloads (weights, config, tokenizer, extra) and generates the same tokens."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lmlab.errors import CheckpointError
from lmlab.eval.sampling import sample
from lmlab.mu import DenseConfig, DenseModel, MUConfig, MUModel, load_checkpoint, save_checkpoint

TEXT = ["the cat sat on the mat", "a dog ran to the park", "the bird sang a song on a tree"]


def word_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(TEXT, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[EOS]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="[EOS]")


def trained(model: torch.nn.Module) -> torch.nn.Module:
    """A few optimizer steps, so the saved weights differ from any fresh initialisation."""
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, model.config.vocab_size, (4, model.config.max_seq_len))
    for _ in range(3):
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


MODELS = {
    "mu-tied": lambda: MUModel(MUConfig(vocab_size=32, max_seq_len=16, n_layers=2)),
    "mu-hashed-untied": lambda: MUModel(
        MUConfig.preset("mu-simple", vocab_size=32, max_seq_len=16, n_layers=2, affinity="hashed",
                        affinity_buckets=8, tie_embeddings=False)
    ),
    "dense-untied": lambda: DenseModel(
        DenseConfig(vocab_size=32, max_seq_len=16, n_layers=2, width=32, n_heads=2, tie_embeddings=False)
    ),
}


@pytest.mark.parametrize("name", MODELS)
def test_best_checkpoint_reloads_and_generates_the_same_tokens(tmp_path, name):
    tokenizer = word_tokenizer()
    model = trained(MODELS[name]())
    save_checkpoint(model, tmp_path / "best", tokenizer=tokenizer, extra={"epoch": 3, "val_ppl": 12.5})
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in (tmp_path / "best").iterdir()}

    loaded, loaded_tokenizer, extra = load_checkpoint(tmp_path / "best")
    assert type(loaded) is type(model) and loaded.config == model.config
    assert extra == {"epoch": 3, "val_ppl": 12.5}
    assert (loaded.head.weight is loaded.tok_emb.weight) == model.config.tie_embeddings
    for (key, value), (loaded_key, loaded_value) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert key == loaded_key and torch.equal(value, loaded_value), key

    prompt = torch.tensor([loaded_tokenizer("the cat sat").input_ids])
    assert prompt.tolist() == [tokenizer("the cat sat").input_ids]
    for kwargs in ({"temperature": 0}, {"temperature": 0.8, "top_k": 10, "top_p": 0.9, "repetition_penalty": 1.3}):
        expected = sample(model, prompt, 12, generator=torch.Generator().manual_seed(5), **kwargs)
        reloaded = sample(loaded, prompt, 12, generator=torch.Generator().manual_seed(5), **kwargs)
        assert torch.equal(reloaded, expected), kwargs


def test_saving_again_replaces_the_checkpoint_and_leaves_no_temporary_files(tmp_path):
    model = MODELS["mu-tied"]()
    save_checkpoint(model, tmp_path / "best", extra={"epoch": 1})
    better = trained(MODELS["mu-tied"]())
    save_checkpoint(better, tmp_path / "best", extra={"epoch": 2})
    loaded, tokenizer, extra = load_checkpoint(tmp_path / "best")
    assert tokenizer is None and extra == {"epoch": 2}
    assert torch.equal(loaded.tok_emb.weight, better.tok_emb.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["best"]


def test_non_json_extra_fails_before_writing(tmp_path):
    with pytest.raises(TypeError):
        save_checkpoint(MODELS["mu-tied"](), tmp_path / "best", extra={"tensor": torch.zeros(1)})
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def checkpoint(tmp_path):
    save_checkpoint(MODELS["mu-tied"](), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_missing_directory_or_files_are_checkpoint_errors(tmp_path, checkpoint):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing"):
        load_checkpoint(checkpoint)
    (checkpoint / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        load_checkpoint(checkpoint)


def test_corrupt_files_are_checkpoint_errors(checkpoint):
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable safetensors file"):
        load_checkpoint(checkpoint)
    (checkpoint / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        load_checkpoint(checkpoint)


def test_config_and_weights_that_disagree_name_the_tensor(checkpoint):
    manifest = json.loads((checkpoint / "config.json").read_text())
    manifest["config"]["vocab_size"] = 40
    (checkpoint / "config.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"tensor 'tok_emb\.weight' has shape \[32, 64\] but config\.json"):
        load_checkpoint(checkpoint)
    manifest["config"]["vocab_size"] = 32
    (checkpoint / "config.json").write_text(json.dumps(manifest))
    tensors = load_file(checkpoint / "model.safetensors")
    del tensors["layers.1.gate.base"]
    save_file(tensors, checkpoint / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"lacks tensor 'layers\.1\.gate\.base'"):
        load_checkpoint(checkpoint)


def test_invalid_config_in_checkpoint_is_a_checkpoint_error(checkpoint):
    manifest = json.loads((checkpoint / "config.json").read_text())
    manifest["config"]["block_shape"] = [3, 3]
    (checkpoint / "config.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="config.json: .*not tiled by block_shape 3x3"):
        load_checkpoint(checkpoint)
    manifest["model"] = "rnn"
    (checkpoint / "config.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="model kind 'rnn'"):
        load_checkpoint(checkpoint)
