"""Run config: one source of truth, mirrored in pyproject.toml and docs, strict on bad values."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedlora.config import ConfigError, default_run_config, from_run_config, markdown_reference
from strategies import build_strategy

ROOT = Path(__file__).resolve().parents[1]


def flatten(table: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def test_pyproject_declares_exactly_the_defaults() -> None:
    declared = flatten(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    assert declared == default_run_config()


def test_docs_reference_is_generated_from_the_code() -> None:
    assert (ROOT / "docs" / "configuration.md").read_text() == markdown_reference()


def test_defaults_parse_and_overrides_apply() -> None:
    cfg = from_run_config({"adapter.r": 4, "train.lr": 1, "strategy.name": "fedavg-products"})
    assert cfg.adapter.r == 4 and cfg.train.lr == 1.0 and cfg.strategy.name == "fedavg-products"
    assert from_run_config({}).model.name == "smollm2"


@pytest.mark.parametrize(
    "override, message",
    [
        ({"adapter.rank": 4}, "unknown run-config key.*adapter.rank"),
        ({"adapter.r": "8"}, "'adapter.r' must be int"),
        ({"adapter.r": 0}, "out of range: adapter.r=0"),
        ({"wire.dtype": "int8"}, "'wire.dtype' is 'int8'; expected one of float32, float16"),
        ({"train.lr-min": 1.0}, "out of range: train.lr-min=1.0"),
        ({"data.partitioner": "random"}, "'data.partitioner'"),
    ],
)
def test_bad_values_name_the_key(override: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_run_config(override)


def test_unknown_strategy_name_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'fedprox-lora'; expected one of fedavg-factors"):
        build_strategy(from_run_config({"strategy.name": "fedprox-lora"}))
