"""The training config: unknown keys, override precedence, types and ranges, YAML round trip."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from sslens.errors import UserError
from sslens.train.config import (
    TrainConfig,
    config_keys,
    load_config,
    packaged_configs,
    parse_assignment,
    save_config,
)


def write_yaml(path, content: dict) -> str:
    path.write_text(yaml.safe_dump(content))
    return str(path)


def test_unknown_override_key_lists_valid_keys_and_a_close_match():
    with pytest.raises(UserError) as caught:
        load_config(None, {"epoch": 3})
    message = str(caught.value)
    assert "'epoch'" in message
    assert "Did you mean 'epochs'?" in message
    for key in config_keys():
        assert key in message
    assert "method_options.temperature" in message


def test_unknown_yaml_key_names_the_file(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", {"method": "simclr", "nonsense": 1})
    with pytest.raises(UserError, match=r"'nonsense' in .*run\.yaml.*Valid keys: method, backbone"):
        load_config(path, {})


def test_overrides_win_over_the_file_and_nested_keys_merge(tmp_path):
    path = write_yaml(
        tmp_path / "run.yaml",
        {"epochs": 3, "lr": 0.1, "method_options": {"temperature": 0.5, "out_dim": 64}},
    )
    config = load_config(path, {"epochs": 5, "method_options.temperature": 0.2})
    assert config.epochs == 5
    assert config.lr == 0.1
    assert config.method_options == {"temperature": 0.2, "out_dim": 64}


def test_plain_key_replaces_a_whole_mapping(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", {"data_options": {"num_images": 100, "seed": 3}})
    config = load_config(path, {"data_options": {"num_images": 50}})
    assert config.data_options == {"num_images": 50}


def test_dotted_key_into_a_scalar_is_rejected():
    with pytest.raises(UserError, match="'epochs' takes a single value"):
        load_config(None, {"epochs.value": 3})


def test_defaults_resolve_the_run_directory():
    config = load_config(None, {"method": "moco", "data": "synthetic"})
    assert config.out == "runs/moco-synthetic"
    assert config.views is None


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"epochs": "three"}, r"'epochs' must be int; got 'three'"),
        ({"epochs": True}, r"'epochs' must be int"),
        ({"epochs": 0}, r"'epochs' must be a positive number of epochs"),
        ({"batch_size": 1}, r"'batch_size' must be at least 2"),
        ({"momentum": 1.0}, r"'momentum' must be in \[0, 1\)"),
        ({"lr": 0.1, "min_lr": 0.2}, r"min_lr \(0.2\) must not exceed lr \(0.1\)"),
        ({"max_steps": 0}, r"'max_steps' must be a positive number of steps"),
        ({"progress": "sometimes"}, r"'progress' must be"),
        ({"device": "gpu"}, r"'device' must be auto, cpu, mps, cuda or cuda:N"),
        ({"method_options": [1, 2]}, r"'method_options' must be dict"),
        ({"method": "simclar"}, r"Unknown method 'simclar'.*Did you mean 'simclr'\?.*moco.*swav"),
        ({"optimizer": "lamb"}, r"Unknown optimizer 'lamb'.*adam, adamw, lars, sgd"),
        ({"views": "nope"}, r"Unknown views 'nope'"),
    ],
)
def test_bad_values_are_rejected_with_the_fix(overrides, pattern):
    with pytest.raises(UserError, match=pattern):
        load_config(None, overrides)


def test_numbers_convert_without_loss():
    config = load_config(None, {"lr": 1, "weight_decay": "1e-4", "max_steps": None})
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert config.weight_decay == pytest.approx(1e-4)
    assert config.max_steps is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("lr=0.1", ("lr", 0.1)),
        ("method_options.temperature=0.2", ("method_options.temperature", 0.2)),
        ("compile=true", ("compile", True)),
        ("views=moco-v2", ("views", "moco-v2")),
        ("views_options.crop_scale=[0.2, 1.0]", ("views_options.crop_scale", [0.2, 1.0])),
        ("max_steps=", ("max_steps", None)),
    ],
)
def test_parse_assignment(text, expected):
    assert parse_assignment(text) == expected


@pytest.mark.parametrize("text", ["lr", "=3", ""])
def test_parse_assignment_needs_key_and_equals(text):
    with pytest.raises(UserError, match="key=value"):
        parse_assignment(text)


def test_saved_config_loads_back_equal(tmp_path):
    config = load_config(None, {"method": "swav", "method_options.num_prototypes": 30, "epochs": 7})
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml", {}) == config


def test_missing_config_file_lists_packaged_configs(tmp_path):
    with pytest.raises(UserError, match="does not exist.*packaged configs: .*simclr-synthetic"):
        load_config(tmp_path / "missing.yaml", {})


def test_yaml_that_is_not_a_mapping_is_rejected(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        load_config(path, {})


@pytest.mark.parametrize("name", packaged_configs())
def test_every_packaged_config_is_valid(name):
    config = load_config(name, {})
    assert isinstance(config, TrainConfig)
    assert dataclasses.asdict(config)["method"] in ("simclr", "moco", "swav", "barlow_twins", "vicreg", "byol", "dino")


def test_configs_are_packaged():
    assert {"simclr-synthetic", "moco-synthetic", "swav-synthetic", "barlow_twins-synthetic", "vicreg-synthetic",
            "byol-synthetic", "dino-synthetic", "moco-cifar10", "byol-cifar10", "dino-cifar10", "barlow_twins-cifar10",
            "vicreg-cifar10"} <= set(packaged_configs())
