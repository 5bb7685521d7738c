"""Loading Hugging Face causal LMs and tokenizers from a local directory or a hub id.

Local directories are what `save_pretrained` writes. Weights load from safetensors only (never pickle).
A hub id is looked up in the local cache first; when it is not cached and the hub cannot be reached,
the error says so in one line and names the offline alternative instead of retrying for a minute.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from lmlab.errors import CheckpointError
from lmlab.hub import hub_reachable

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# Any one of these makes a directory loadable by AutoTokenizer (fast, sentencepiece or vocab-based tokenizers).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model",
                   "vocab.txt")

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def is_local(name_or_path: str) -> bool:
    """A path (existing, or written like one) rather than a hub id such as `gpt2` or `owner/name`."""
    return (Path(name_or_path).expanduser().exists() or name_or_path.startswith((".", "/", "~"))
            or not _HUB_ID.fullmatch(name_or_path))


def check_model_dir(path: Path) -> None:
    """A local model directory must hold config.json and safetensors weights."""
    if not path.exists():
        raise CheckpointError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"model path {path} is a file; give the directory written by save_pretrained")
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path} has no config.json; give a directory written by save_pretrained")
    has_safetensors = any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").exists()
    if not has_safetensors:
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        if pickled:
            raise CheckpointError(
                f"{path} has only pickle weights ({', '.join(sorted(pickled))}); lmlab loads safetensors only - "
                f"convert them in a trusted environment with model.save_pretrained(dir, safe_serialization=True)"
            )
        raise CheckpointError(f"{path} has no model weights (*.safetensors); it holds only a config - write the model "
                              "with model.save_pretrained(dir), which saves its weights beside the config")


def check_weight_files(path: Path) -> None:
    """Every safetensors file of a model directory has a readable header that covers the file (cheap: the
    tensors are not read), so a truncated or corrupt file is named before transformers sees it."""
    for weights in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt"):
                pass
        except Exception as exc:  # safetensors raises its own error types for truncated or garbled files
            try:
                with open(weights, "rb") as f:
                    head = f.read(9)
            except OSError:
                head = b""
            # safetensors: an 8-byte header length, then the JSON header's "{"; a pickle: PROTO (0x80) and its
            # version 2-5; torch.save: a zip (PK\x03\x04) of pickles
            raw_pickle = len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5
            pickled = head[8:9] != b"{" and (raw_pickle or head[:4] == b"PK\x03\x04")
            if pickled:  # a pickle (or torch.save's zip of pickles), renamed
                raise CheckpointError(f"cannot load model weights from {path}: {weights.name} is a pickle (torch.save),"
                                      " not safetensors, whatever its name; lmlab never unpickles - convert it in a "
                                      "trusted environment with model.save_pretrained(dir, safe_serialization=True)"
                                      ) from None
            raise CheckpointError(f"cannot load model weights from {path}: {weights.name} is not a readable "
                                  f"safetensors file ({str(exc).splitlines()[0]}); it may be truncated or corrupt - "
                                  "copy or save the model again") from None


def resolve(name_or_path: str, *, weights: bool = True) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it is local-only). A local model directory must hold
    a config and safetensors weights unless only its tokenizer is wanted (`weights=False`)."""
    path = Path(name_or_path).expanduser()
    if is_local(name_or_path):
        if weights:
            check_model_dir(path)
        elif not path.is_dir():
            raise CheckpointError(f"tokenizer directory {path} does not exist")
        return str(path), True
    return name_or_path, False


def _from_hub_or_cache(loader: Callable, name: str, what: str, **kwargs):
    try:
        return loader(name, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        pass
    if not hub_reachable():
        raise CheckpointError(
            f"{what} '{name}' is not in the local Hugging Face cache and the hub is unreachable (offline); "
            f"give a local directory written by save_pretrained (`--model DIR` for lmlab eval, `model=DIR` for a "
            f"study) or run where the hub is reachable"
        ) from None
    try:
        return loader(name, **kwargs)
    except OSError as exc:
        raise CheckpointError(f"cannot load {what} '{name}' from the hub: {str(exc).splitlines()[0]}") from None


def load_config(name_or_path: str, trust_remote_code: bool = False) -> PretrainedConfig:
    source, local = resolve(name_or_path)
    try:
        if local:
            return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        return _from_hub_or_cache(AutoConfig.from_pretrained, source, "model", trust_remote_code=trust_remote_code)
    except CheckpointError:
        raise
    except (OSError, ValueError) as exc:  # not JSON, an unknown architecture, custom code without trust
        if "trust_remote_code" in str(exc):
            raise CheckpointError(f"{name_or_path} needs its own Python code (auto_map in config.json), which lmlab "
                                  "does not run by default; read that code, then pass --trust-remote-code (or "
                                  "trust_remote_code=true in the study config) if you trust it") from None
        raise CheckpointError(f"{name_or_path}: unusable config.json ({str(exc).splitlines()[0]})") from None
    except Exception as exc:  # a field of the wrong type (transformers' strict config dataclasses) and the like
        raise _config_error(name_or_path, exc) from None


def _config_error(name_or_path: str, exc: Exception) -> CheckpointError:
    return CheckpointError(f"{name_or_path}: unusable config.json ({_config_problem(exc)}); fix that field, or save "
                           "the model again with save_pretrained")


def _config_problem(exc: Exception) -> str:
    """The readable core of an error raised while building a config: for a wrongly typed field, the field, the
    expected type and the value (`Field 'hidden_size' expected int, got str (value: 'abc')`)."""
    cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
    text = " ".join(str(cause).split()) or type(cause).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: str = "float32",
    config_fn: Callable[[PretrainedConfig], PretrainedConfig] | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """A causal LM from a local directory or hub id, in eval mode.

    `config_fn` edits the config BEFORE the model is built (e.g. RoPE scaling for a longer context:
    setting it afterwards has no effect). `trust_remote_code` stays off unless the user sets it.
    """
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    config = load_config(name_or_path, trust_remote_code)
    if config_fn is not None:
        config = config_fn(config)
    source, local = resolve(name_or_path)
    # Mismatched shapes are reported below by name (transformers' own error points at a report it does not show).
    kwargs = dict(config=config, dtype=DTYPES[dtype], use_safetensors=True, trust_remote_code=trust_remote_code,
                  output_loading_info=True, ignore_mismatched_sizes=True)
    try:
        if local:
            check_weight_files(Path(source))
            model, info = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        else:
            model, info = _from_hub_or_cache(AutoModelForCausalLM.from_pretrained, source, "model", **kwargs)
    except CheckpointError:
        raise
    except Exception as exc:  # corrupt or truncated weights surface as many different exception types
        raise CheckpointError(f"cannot load model weights from {name_or_path}: {str(exc).splitlines()[0]}") from None
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda item: str(item[0]))
    if mismatched:  # transformers would initialise them randomly
        key, stored, expected = (list(mismatched[0]) + [None, None])[:3]
        shapes = (f" is {list(stored)} in the weights but {list(expected)} by config.json"
                  if stored is not None and expected is not None else " does not have the shape config.json gives")
        raise CheckpointError(f"the weights of {name_or_path} do not fit its config.json: tensor '{key}'{shapes} "
                              f"({len(mismatched)} tensor(s) differ); the weight files and config.json do not belong "
                              "together - restore the config.json saved with these weights")
    missing = sorted(info["missing_keys"])
    if missing:  # transformers would initialise them randomly and only log a warning
        raise CheckpointError(f"the weights of {name_or_path} lack tensor '{missing[0]}' ({len(missing)} missing) that "
                              "its config.json needs; the weight files and config.json do not belong together")
    model.eval()
    return model


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The model's tokenizer (a model directory, a tokenizer-only directory or a hub id); a pad token is
    set (to EOS) when it has none."""
    source, local = resolve(name_or_path, weights=False)
    if local and not any((Path(source) / name).exists() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{source} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); save the "
                              "tokenizer there with tokenizer.save_pretrained(dir)")
    try:
        if local:
            tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        else:
            tok = _from_hub_or_cache(AutoTokenizer.from_pretrained, source, "tokenizer",
                                     trust_remote_code=trust_remote_code)
    except CheckpointError:
        raise
    except Exception as exc:
        if type(exc).__name__.startswith("StrictDataclass"):  # the tokenizer read a config.json with a bad field
            raise _config_error(name_or_path, exc) from None
        raise CheckpointError(f"cannot load the tokenizer of {name_or_path}: {str(exc).splitlines()[0]}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def prefix_token_id(tokenizer) -> int:
    """The token that starts every scored document: BOS, else EOS (docs/protocol.md section 4)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise CheckpointError("the tokenizer has neither a BOS nor an EOS token to start documents with")
    return token


def learned_positions(config: PretrainedConfig) -> int | None:
    """The size of a GPT-2-style table of learned absolute positions (n_positions), which a model cannot read
    past; None for models without one (RoPE and the like)."""
    value = getattr(config.get_text_config(), "n_positions", None)
    return value if isinstance(value, int) and value > 0 else None


def context_length(config: PretrainedConfig) -> int | None:
    """The context a Hugging Face config was built for, under whichever name its architecture uses."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def kv_cache(inputs_or_output) -> object | None:
    """The KV cache in a forward's keyword arguments or in its output: `cache` from transformers 5.25 on (which
    still accepts and returns `past_key_values`, deprecated, with a message), `past_key_values` before."""
    if isinstance(inputs_or_output, dict):  # kwargs, and transformers' ModelOutput (a dict of its set fields)
        for key in ("cache", "past_key_values"):
            if inputs_or_output.get(key) is not None:
                return inputs_or_output[key]
        return None
    return getattr(inputs_or_output, "past_key_values", None)


@functools.cache
def forward_takes(model_type: type, argument: str) -> bool:
    """Whether `model_type.forward` names `argument` in its signature (not only through **kwargs)."""
    try:
        return argument in inspect.signature(model_type.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return False
