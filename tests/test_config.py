"""Config loading: strict keys with suggestions, typed values, aliases, dotted overrides, presets with `extends`."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import pytest
from pydantic import Field

from lmlab.config import Section, load_config, load_preset, load_yaml, preset_path
from lmlab.errors import ConfigError


class OptimPart(Section):
    epochs: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    schedule: Literal["cosine", "linear"] = "cosine"


class AdapterPart(Section):
    rank: int = Field(8, ge=1)
    dropout: float = Field(0.0, ge=0, le=1)


class StudyConfig(Section):
    ALIASES: ClassVar[dict[str, str]] = {"epochs": "train.epochs", "lr": "train.lr"}

    name: str = "study"
    seeds: list[int] = [42]
    train: OptimPart = OptimPart()
    adapter: AdapterPart = AdapterPart()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def config_error(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(StudyConfig, *args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_yaml_values_and_defaults_load_into_the_typed_config(tmp_path):
    path = write(tmp_path / "c.yaml", "name: demo\nseeds: [1, 2]\ntrain:\n  lr: 0.01\n")
    cfg = load_config(StudyConfig, path)
    assert cfg.name == "demo" and cfg.seeds == [1, 2]
    assert cfg.train.lr == 0.01 and cfg.train.epochs == 1 and cfg.adapter.rank == 8


def test_unknown_key_in_yaml_names_it_and_suggests_the_closest(tmp_path):
    message = config_error(write(tmp_path / "c.yaml", "train:\n  epoch: 3\n"))
    assert "'train.epoch'" in message
    assert "did you mean 'train.epochs'" in message


def test_unknown_top_level_key_in_yaml_suggests_the_closest(tmp_path):
    message = config_error(write(tmp_path / "c.yaml", "adaptor:\n  rank: 4\n"))
    assert "'adaptor'" in message and "did you mean 'adapter'" in message


def test_unknown_key_in_an_override_names_it_and_suggests_the_closest():
    message = config_error(None, ["trian.lr=0.1"])
    assert "'trian.lr'" in message and "did you mean 'train.lr'" in message
    message = config_error(None, ["adapter.rnak=4"])
    assert "'adapter.rnak'" in message and "did you mean 'adapter.rank'" in message


def test_override_without_equals_sign_is_rejected():
    assert "key=value" in config_error(None, ["train.lr"])


@pytest.mark.parametrize(("override", "key", "value"), [
    ("train.epochs=abc", "train.epochs", "'abc'"),
    ("train.epochs=0", "train.epochs", "0"),
    ("adapter.dropout=1.5", "adapter.dropout", "1.5"),
    ("train.lr=-1e-3", "train.lr", "'-1e-3'"),  # YAML 1.1 reads 1e-3 as text; pydantic converts valid ones
    ("train.schedule=step", "train.schedule", "'step'"),
])
def test_wrong_type_or_out_of_range_value_names_key_and_value(override, key, value):
    message = config_error(None, [override])
    assert message.startswith(f"{key} = {value}:"), message


def test_wrong_value_in_yaml_names_key_value_and_file(tmp_path):
    path = write(tmp_path / "c.yaml", "adapter:\n  rank: -2\n")
    message = config_error(path)
    assert message.startswith("adapter.rank = -2:") and str(path) in message
    assert "greater than or equal to 1" in message


def test_aliases_set_the_dotted_field():
    cfg = load_config(StudyConfig, None, ["epochs=2", "lr=5e-4"])
    assert cfg.train.epochs == 2 and cfg.train.lr == 5e-4


def test_a_key_given_twice_takes_its_last_value_also_under_its_short_name():
    """As the README says: a script can append an override to a base command, and the later one wins, whichever
    name (short or dotted) either uses."""
    assert load_config(StudyConfig, None, ["train.lr=1e-3", "train.lr=2e-3"]).train.lr == 2e-3
    assert load_config(StudyConfig, None, ["lr=1e-3", "train.lr=3e-3"]).train.lr == 3e-3
    assert load_config(StudyConfig, None, ["train.lr=3e-3", "lr=4e-3"]).train.lr == 4e-3


def test_nested_dotted_override_changes_one_leaf_and_keeps_the_rest(tmp_path):
    path = write(tmp_path / "c.yaml", "train:\n  lr: 0.01\n  epochs: 4\nadapter:\n  dropout: 0.1\n")
    cfg = load_config(StudyConfig, path, ["adapter.rank=16", "train.epochs=5", "seeds=[7, 8, 9]"])
    assert cfg.adapter.rank == 16 and cfg.adapter.dropout == 0.1
    assert cfg.train.epochs == 5 and cfg.train.lr == 0.01
    assert cfg.seeds == [7, 8, 9]


def test_bad_yaml_error_carries_the_line_number(tmp_path):
    path = write(tmp_path / "c.yaml", "name: demo\ntrain:\n  lr: [0.1, 0.2\n  epochs: 3\nseeds: [1]\n")
    with pytest.raises(ConfigError) as info:
        load_yaml(path)
    message = str(info.value)
    assert str(path) in message and "invalid YAML" in message
    assert "line 4" in message or "line 5" in message  # the unclosed list is detected where the next key starts


def test_bad_yaml_line_number_points_at_the_broken_line(tmp_path):
    path = write(tmp_path / "c.yaml", "name: demo\nseeds: [1]\ntrain: {lr: 0.1\n")
    message = config_error(path)
    assert "line 3" in message or "line 4" in message
    path = write(tmp_path / "d.yaml", "name: demo\nseeds: [1]\n\tbad: tab\n")
    assert "line 3" in config_error(path)


def test_top_level_yaml_must_be_a_mapping(tmp_path):
    assert "mapping" in config_error(write(tmp_path / "c.yaml", "- 1\n- 2\n"))


@pytest.fixture
def preset_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LMLAB_CONFIG_DIR", str(tmp_path))
    write(tmp_path / "study" / "base.yaml", "name: base\nseeds: [1, 2, 3]\ntrain:\n  lr: 0.01\n  epochs: 3\n"
                                             "adapter:\n  rank: 4\n  dropout: 0.2\n")
    write(tmp_path / "study" / "child.yaml", "extends: study/base\nname: child\ntrain:\n  epochs: 5\n")
    write(tmp_path / "study" / "grandchild.yaml", "extends: study/child\nadapter:\n  rank: 32\n")
    return tmp_path


def test_preset_extends_merges_nested_sections(preset_dir):
    cfg = load_config(StudyConfig, preset_path("study", "child"))
    assert cfg.name == "child" and cfg.seeds == [1, 2, 3]
    assert cfg.train.epochs == 5 and cfg.train.lr == 0.01  # merged, not replaced
    assert cfg.adapter.rank == 4 and cfg.adapter.dropout == 0.2


def test_preset_extends_chains_and_overrides_apply_last(preset_dir):
    cfg = load_config(StudyConfig, preset_path("study", "grandchild"), ["lr=0.5"])
    assert cfg.name == "child" and cfg.adapter.rank == 32 and cfg.adapter.dropout == 0.2
    assert cfg.train.epochs == 5 and cfg.train.lr == 0.5


def test_preset_extends_cycle_is_an_error(preset_dir):
    write(preset_dir / "study" / "a.yaml", "extends: study/b\n")
    write(preset_dir / "study" / "b.yaml", "extends: study/a\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_preset(preset_path("study", "a"))


def test_unknown_preset_lists_the_available_ones(preset_dir):
    with pytest.raises(ConfigError) as info:
        preset_path("study", "papr")
    message = str(info.value)
    assert "'papr'" in message and "base, child, grandchild" in message


def test_missing_config_file_is_a_config_error(tmp_path):
    assert "does not exist" in config_error(tmp_path / "nope.yaml")
