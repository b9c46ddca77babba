"""The federation configuration: TOML in, validated, explained in words a hospital admin understands."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import ConfigError, FederationConfig

DEMO = Path(__file__).resolve().parents[2] / "simulations" / "configs" / "demo.toml"


def test_the_demo_configuration_loads() -> None:
    config = FederationConfig.from_toml(DEMO)
    assert config.privacy.enabled and config.strategy.name == "fedprox"
    assert config.model.class_names == ["normal", "finding"]


def test_every_setting_has_a_sensible_default() -> None:
    config = FederationConfig.from_dict({})
    assert config.model.architecture == "resnet18" and config.privacy.target_epsilon > 0


def test_an_unknown_key_is_refused_naming_its_section(tmp_path: Path) -> None:
    path = tmp_path / "fed.toml"
    path.write_text("[privacy]\ntarget_epsilonn = 3\n")
    with pytest.raises(ConfigError, match=r"\[privacy\] target_epsilonn: unknown setting"):
        FederationConfig.from_toml(path)


def test_a_bad_value_says_what_was_written_and_what_is_allowed() -> None:
    with pytest.raises(ConfigError) as caught:
        FederationConfig.from_dict({"privacy": {"target_epsilon": -1}, "training": {"rounds": 0}})
    message = str(caught.value)
    assert "2 problem(s)" in message
    assert "[privacy] target_epsilon: Input should be greater than 0 (you wrote -1)" in message
    assert "[training] rounds" in message


def test_a_check_across_a_section_names_the_section() -> None:
    with pytest.raises(ConfigError, match=r"\[model\]: class_names must list 3 different labels"):
        FederationConfig.from_dict({"model": {"num_classes": 3}})


def test_a_missing_file_and_broken_toml_are_explained(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such configuration file"):
        FederationConfig.from_toml(tmp_path / "absent.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[model\narchitecture = 'resnet18'\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        FederationConfig.from_toml(broken)


def test_the_configuration_travels_to_sites_as_json_unchanged() -> None:
    config = FederationConfig.from_toml(DEMO)
    assert FederationConfig.from_json(config.to_json()) == config


def test_a_relative_backbone_checkpoint_is_taken_relative_to_the_toml_file(tmp_path: Path) -> None:
    (tmp_path / "study").mkdir()
    path = tmp_path / "study" / "federation.toml"
    path.write_text('[model]\ncheckpoint = "weights/backbone.pt"\n')

    assert FederationConfig.from_toml(path).model.checkpoint == (tmp_path / "study" / "weights" / "backbone.pt")
