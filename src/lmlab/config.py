"""Typed configs: pydantic models, YAML presets and `key=value` overrides with readable errors.

Every config section derives from `Section` (unknown keys are errors, assignments are validated).
A study config is loaded from `configs/<study>/<preset>.yaml` (or a YAML file path), then overridden
by `key=value` arguments; nested keys use dots (`train.lr=1e-4`) and a study may declare short
aliases for the flags its research notes use (`epochs` -> `train.epochs`).

Every problem becomes a `ConfigError` whose message names the key, the value, the rule, and - for an
unknown key - the closest valid key.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from lmlab.errors import ConfigError

T = TypeVar("T", bound="Section")


class Section(BaseModel):
    """Base of every config model: strict about unknown keys, validates on assignment."""

    # NaN/inf pass every `gt=`/`ge=` bound pydantic checks (inf > 0), so no float field accepts them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)

    # Short flag names (as in the research notes) mapped to dotted field paths.
    ALIASES: ClassVar[dict[str, str]] = {}

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_as_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic reads true / false as 1 / 0 for a number field: `adapter.r=true` would train at rank 1 without a
        word. A number field (not also a boolean one) refuses them."""
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool):
            kinds, found, message = _scalar_types(annotation), value, "expected a number, got {value}"
        elif isinstance(value, (list, tuple)) and any(isinstance(v, bool) for v in value):
            # seeds=[true]: a list of numbers takes no booleans either
            kinds, message = _element_types(annotation), "expected numbers, got {value} in the list"
            found = next(v for v in value if isinstance(v, bool))
        else:
            return value
        if bool not in kinds and kinds & {int, float}:
            raise PydanticCustomError("bool_as_number", message, {"value": str(found).lower()})
        return value


# ---------------------------------------------------------------------------------------------------
# Keys


def valid_keys(model_cls: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key a config accepts, nested sections included."""
    keys = []
    for name, field in model_cls.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        sub = _section_type(field.annotation)
        if sub is not None:
            keys.extend(valid_keys(sub, dotted + "."))
    return keys


def _scalar_types(annotation: Any) -> set[type]:
    """The plain types an annotation admits (`int`, `float | None` -> {float, NoneType}, `Annotated[int, ...]` ->
    {int}); nothing inside a list."""
    if isinstance(annotation, type):
        return {annotation}
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _scalar_types(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return {t for arg in typing.get_args(annotation) for t in _scalar_types(arg)}
    return set()


def _element_types(annotation: Any) -> set[type]:
    """The plain types the items of a list / tuple annotation admit (`list[int] | None` -> {int})."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _element_types(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return {t for arg in typing.get_args(annotation) for t in _element_types(arg)}
    if origin in (list, tuple, set, frozenset):
        return {t for arg in typing.get_args(annotation) if arg is not Ellipsis for t in _scalar_types(arg)}
    return set()


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (`X`, `X | None`), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _suggest(key: str, candidates: list[str]) -> str:
    leaf_matches = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not leaf_matches:
        tail = key.rsplit(".", 1)[-1]
        leaf_matches = [c for c in candidates if c.rsplit(".", 1)[-1] == tail][:1] or difflib.get_close_matches(
            tail, candidates, n=1, cutoff=0.6
        )
    return f"; did you mean '{leaf_matches[0]}'?" if leaf_matches else ""


def unknown_key_message(key: str, model_cls: type[BaseModel], where: str) -> str:
    keys = valid_keys(model_cls) + list(getattr(model_cls, "ALIASES", {}))
    return f"unknown key '{key}' {where}{_suggest(key, keys)}"


# ---------------------------------------------------------------------------------------------------
# YAML


def load_yaml(path: str | os.PathLike) -> dict:
    """Parse a YAML mapping safely (no object construction); errors carry the line number."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except OSError as exc:  # a directory, a name too long, no permission, ...
        shown = str(path) if len(str(path)) <= 200 else str(path)[:200] + "..."
        raise ConfigError(f"config file {shown} cannot be read ({exc.strerror or exc}); give a readable YAML "
                          "file") from None
    try:
        data = _deep_copy(yaml.safe_load(text))  # a plain tree: aliases become copies
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{line}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply, or an alias (*name) contains itself") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level, got {type(data).__name__}"
                          " - write one `key: value` per line, e.g. `extends: hylorada/smoke` and `train: {lr: 0.001}`")
    return data


def parse_value(text: str) -> Any:
    """An override value: YAML scalars and flow lists/maps (`3`, `1e-4`, `true`, `null`, `[a, b]`).

    Text that is not YAML (or nests too deeply, or holds an alias containing itself) stays a string, which
    validation then names with its key.
    """
    try:
        value = _deep_copy(yaml.safe_load(text))
    except (yaml.YAMLError, RecursionError):
        return text
    return text if value is None and text.strip() not in ("null", "~", "None", "none") else value


# ---------------------------------------------------------------------------------------------------
# Overrides


def apply_overrides(data: dict, overrides: list[str], model_cls: type[Section]) -> dict:
    """Return a copy of `data` with `key=value` overrides applied (dots for nested keys)."""
    data = _deep_copy(data)
    aliases = getattr(model_cls, "ALIASES", {})
    known = set(valid_keys(model_cls))
    for item in overrides:  # a key given twice takes its last value, as scripts that extend a base list expect
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.lr=1e-4)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}' has no key before its '=': write key=value, e.g. train.lr=1e-4")
        path = aliases.get(key, key)
        if path not in known:
            raise ConfigError(unknown_key_message(key, model_cls, "in the command-line overrides"))

        node = data
        parts = path.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = parse_value(raw)
    return data


def resolve_aliases(data: dict, model_cls: type[Section], where: str) -> dict:
    """A preset file's short keys (the study's ALIASES, as on the command line: `learning_rate: 0.1`) moved to
    the keys they stand for (`train: {lr: 0.1}`); a file that sets both is an error naming them."""
    aliases = getattr(model_cls, "ALIASES", {})
    data = _deep_copy(data)
    for key in [k for k in data if k in aliases and k not in model_cls.model_fields]:
        value = data.pop(key)
        node = data
        parts = aliases[key].split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{where}: '{key}' stands for '{aliases[key]}', but '{part}' is set to "
                                  f"{child!r}, not a mapping; set '{aliases[key]}' in the '{part}' section")
            node = child
        if parts[-1] in node:
            raise ConfigError(f"{where}: '{key}' and '{aliases[key]}' are the same setting ('{key}' is short for "
                              f"'{aliases[key]}'); keep one")
        node[parts[-1]] = value
    return data


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------
# Validation


def build(model_cls: type[T], data: dict, where: str = "") -> T:
    """Validate `data` into `model_cls`, turning the first pydantic error into a one-line ConfigError."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, model_cls, where)) from None


def describe_validation_error(exc: ValidationError, model_cls: type[BaseModel], where: str = "") -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "<config>"
    suffix = f" ({where})" if where else ""
    if err["type"] == "extra_forbidden":
        return unknown_key_message(key, model_cls, f"in {model_cls.__name__}{suffix}")
    if err["type"] == "missing":
        return f"missing required key '{key}' in {model_cls.__name__}{suffix}"
    shown = repr(err.get("input"))
    if len(shown) > 80:  # a whole mapping or a pasted document: the start identifies it
        shown = shown[:77] + "..."
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    more = f" (and {len(exc.errors()) - 1} more problem(s))" if len(exc.errors()) > 1 else ""
    if not err["loc"] and err["type"] == "value_error":  # a rule across fields: its message names the keys
        return f"{msg}{suffix}{more}"
    return f"{key} = {shown}: {msg}{suffix}{more}"


# ---------------------------------------------------------------------------------------------------
# Presets


def config_dir() -> Path:
    """Where the YAML presets live: $LMLAB_CONFIG_DIR, the source checkout, or the installed package."""
    env = os.environ.get("LMLAB_CONFIG_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    checkout = here.parents[2] / "configs"
    if checkout.is_dir():
        return checkout
    return here.parent / "configs"


def preset_path(study: str, preset: str) -> Path:
    """A preset name (`smoke`, `default`, `paper`) of a study, or a path to a YAML file."""
    if preset.endswith((".yaml", ".yml")) or os.sep in preset:
        return Path(preset)
    path = config_dir() / study / f"{preset}.yaml"
    if not path.exists():
        available = sorted(p.stem for p in (config_dir() / study).glob("*.yaml"))
        raise ConfigError(
            f"preset '{preset}' does not exist for study '{study}'; choose one of {', '.join(available) or '(none)'}"
            " or give a path to a YAML file"
        )
    return path


def deep_merge(base: dict, update: dict) -> dict:
    """`update` laid over `base`: nested mappings merge, everything else replaces."""
    merged = _deep_copy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = _deep_copy(value)
    return merged


def load_preset(path: str | os.PathLike, _seen: tuple = (), model_cls: type[Section] | None = None) -> dict:
    """A preset's mapping; `extends: <study>/<preset>` (or a YAML path) starts from another preset. With
    `model_cls`, each file's short keys (its ALIASES) are resolved before the files merge."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle")
    data = load_yaml(path)
    if not data:  # an empty file (or comments only) would silently run the built-in defaults
        raise ConfigError(f"preset file {path} is empty; give the settings to change, e.g. `extends: <study>/smoke` "
                          "and the keys that differ (or use a built-in preset: --preset smoke | default | paper)")
    parent = data.pop("extends", None)
    if model_cls is not None:
        data = resolve_aliases(data, model_cls, str(path))
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: 'extends' must name a preset such as hylorada/default")
    parent_path = Path(parent) if parent.endswith((".yaml", ".yml")) else config_dir() / f"{parent}.yaml"
    if not parent_path.is_absolute() and not parent_path.exists():
        parent_path = path.parent / parent_path
    if not parent_path.exists():
        study = parent.split("/")[0] if "/" in parent and not parent.endswith((".yaml", ".yml")) else None
        presets = sorted(p.stem for p in (config_dir() / study).glob("*.yaml")) if study else []
        raise ConfigError(f"{path}: 'extends: {parent}' names no preset ({parent_path} does not exist); "
                          + (f"{study}'s presets are {', '.join(presets)}" if presets else
                             "name one such as hylorada/default, or a YAML file's path"))
    return deep_merge(load_preset(parent_path, (*_seen, path), model_cls), data)


def load_config(model_cls: type[T], path: str | os.PathLike | None, overrides: list[str] = ()) -> T:
    """Load a YAML preset (or start from the defaults), apply overrides, validate. An invalid value names where it
    came from: the command line when an override set it, else the preset file."""
    data = load_preset(path, model_cls=model_cls) if path is not None else {}
    data = apply_overrides(data, list(overrides), model_cls)
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        where = str(path) if path is not None else ""
        loc = [str(p) for p in exc.errors()[0]["loc"]]
        aliases = getattr(model_cls, "ALIASES", {})
        for item in overrides:
            key = item.split("=", 1)[0].strip()
            parts = aliases.get(key, key).split(".")
            if loc[:len(parts)] == parts:  # this override set the value (or the section holding it)
                where = "on the command line"
                break
        else:
            if not loc and overrides:  # a rule across fields, which the overrides may take part in
                where = f"{where} with the command-line overrides" if where else "the command-line overrides"
        raise ConfigError(describe_validation_error(exc, model_cls, where)) from None
