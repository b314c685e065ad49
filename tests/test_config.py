"""Run config: one source of truth, mirrored in pyproject.toml and docs, strict on bad values."""

from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from fedlora import runtime
from fedlora.config import (
    ConfigError,
    applies_to,
    default_run_config,
    from_run_config,
    iter_options,
    markdown_reference,
    method_sections,
)
from fedlora.methods import METHODS, NEEDS_STRATEGY, SETTINGS, all_methods
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


def test_every_methods_settings_are_in_the_generated_docs() -> None:
    """A method's own options appear in docs/configuration.md, each naming the method it applies to."""
    docs = (ROOT / "docs" / "configuration.md").read_text()
    rows = {line.split("`")[1]: line for line in docs.splitlines() if line.startswith("| `")}
    assert f"`{'`, `'.join(METHODS)}`" in rows["adapter.method"]
    for method in all_methods():
        settings = method.settings
        own = (
            [f"{settings.section}.{f.name.replace('_', '-')}" for f in dataclasses.fields(settings)] if settings else []
        )
        applying = [key for key, methods in applies_to().items() if method.name in methods]
        for key in {*own, *applying}:
            assert key in rows, f"{method.name}'s option '{key}' is missing from docs/configuration.md"
        for key in applying:
            assert f"`{method.name}`" in rows[key].split("Applies to:")[1], (method.name, key)


def test_every_scoped_option_is_used_and_every_use_is_a_scoped_option() -> None:
    """``AdapterMethod.uses`` names only shared options declared ``scoped``, and each of those applies somewhere."""
    options = dict(iter_options())
    scoped = {key for key, opt in options.items() if opt.metadata["scoped"]}
    for method in all_methods():
        assert method.uses <= scoped, f"{method.name} uses unknown or unscoped options {method.uses - scoped}"
    assert all(applies_to()[key] for key in scoped)


def _changed(value: Any) -> Any:
    """Another value of ``value``'s type (the cache key only compares, so it need not be in range)."""
    return not value if isinstance(value, bool) else value + (1 if isinstance(value, int | float) else "x")


def test_the_model_cache_key_covers_every_setting_that_builds_the_model() -> None:
    """Changing the base's, the adapter's or the chosen method's own setting changes the worker's cache key.

    A key that missed one would hand a worker a model built with the old value
    (nothing fails: it silently trains the wrong adapter). Another method's
    section is not in a run config (parsing keeps it at its defaults), and the
    method itself is ``adapter.method``, part of the key.
    """
    cfg = from_run_config({})
    for section in ("model", "adapter", *method_sections()):
        settings = getattr(cfg, section)
        own = section in method_sections()  # held as a run of a method owning this section holds it
        held = dataclasses.replace(cfg, method_settings=(settings,)) if own else cfg
        key = runtime.model_key(held, "causal-lm", 0)
        for option in dataclasses.fields(settings):
            changed = dataclasses.replace(settings, **{option.name: _changed(getattr(settings, option.name))})
            if own:
                other = dataclasses.replace(held, method_settings=(changed,))
            else:
                other = dataclasses.replace(held, **{section: changed})
            assert getattr(other, section) == changed
            assert runtime.model_key(other, "causal-lm", 0) != key, f"{section}.{option.name} is not in the cache key"


def test_the_registrys_plain_declarations_are_the_methods_own() -> None:
    """What parsing reads of the methods it does not import (their keys, defaults, strategies) is what they declare."""
    declared = [(key, option.default) for key, option in iter_options() if key.partition(".")[0] in method_sections()]
    assert list(SETTINGS.items()) == declared
    assert NEEDS_STRATEGY == {m.name: m.strategy for m in all_methods() if m.strategy}


def test_parsing_imports_only_the_chosen_method() -> None:
    """A run config holds every method's keys; parsing the default one imports LoRA's module, no other method's."""
    script = (
        "import sys\n"
        "from fedlora.config import default_run_config, from_run_config\n"
        "from_run_config(default_run_config())\n"
        "print(sorted(m for m in sys.modules if m.startswith('fedlora.methods.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    loaded = ast.literal_eval(out.strip().splitlines()[-1])
    assert "fedlora.methods.lisa" not in loaded and "fedlora.methods.qlora" not in loaded
    assert loaded == ["fedlora.methods.base", "fedlora.methods.lora"]


def test_another_methods_key_is_checked_without_its_module() -> None:
    """Known, of the right type and at its default, or refused naming the key and the methods it applies to."""
    assert from_run_config({"loramoe.experts": 4}).adapter.method == "lora"
    refused = "run-config key 'loramoe.experts' does not apply to adapter.method='lora' (only to loramoe)"
    with pytest.raises(ConfigError, match=re.escape(refused)):
        from_run_config({"loramoe.experts": 2})
    with pytest.raises(ConfigError, match=r"'qlora\.double-quant' must be bool"):
        from_run_config({"qlora.double-quant": "yes"})
    assert from_run_config({}).lisa.layers == 2  # another method's section reads as its defaults
