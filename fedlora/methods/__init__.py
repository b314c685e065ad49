"""Adapter methods, one module per method, selected by ``adapter.method``.

Each is a small class over a peft config (see :class:`fedlora.methods.base.AdapterMethod`)
that also declares its run-config settings (:attr:`~fedlora.methods.base.AdapterMethod.settings`)
and the shared options it reads (:attr:`~fedlora.methods.base.AdapterMethod.uses`). Adding a
method means adding a module and one line to :data:`METHODS`, never editing the
apps, the strategies or :mod:`fedlora.config` (docs/methods.md lists the steps).

The registry is lazy: it maps a name to where its class lives, and a method's
module is imported on first :func:`get_method`, so this package imports nothing
itself and :mod:`fedlora.config` can import it without a cycle (method modules
import the config in turn). Parsing a run config imports only the chosen
method: Flower passes every key of every method, so what the parser needs to
know of the others (their keys and defaults, :data:`SETTINGS`, and the strategy
a method claims, :data:`NEEDS_STRATEGY`) is declared here as plain data, and
``tests/test_config.py`` checks it against the modules' own declarations.
"""

from __future__ import annotations

import importlib
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

    from fedlora.methods.base import AdapterMethod

METHODS: dict[str, str] = {
    "lora": "fedlora.methods.lora:Lora",
    "qlora": "fedlora.methods.qlora:QLora",
    "dora": "fedlora.methods.dora:Dora",
    "lora-fa": "fedlora.methods.lora_fa:LoraFA",
    "loraplus": "fedlora.methods.loraplus:LoraPlus",
    "adalora": "fedlora.methods.adalora:AdaLora",
    "mtlora": "fedlora.methods.mtlora:MTLora",
    "loramoe": "fedlora.methods.loramoe:LoraMoE",
    "delta-lora": "fedlora.methods.delta_lora:DeltaLora",
    "longlora": "fedlora.methods.longlora:LongLora",
    "lora-drop": "fedlora.methods.lora_drop:LoraDrop",
    "vera": "fedlora.methods.vera:Vera",
    "prompt-tuning": "fedlora.methods.prompts:PromptTuning",
    "p-tuning": "fedlora.methods.prompts:PTuning",
    "prefix-tuning": "fedlora.methods.prompts:PrefixTuning",
    "p-tuning-v2": "fedlora.methods.prompts:PTuningV2",
    "bottleneck": "fedlora.methods.bottleneck:Bottleneck",
    "lisa": "fedlora.methods.lisa:Lisa",
}
"""Every ``adapter.method``: its name, and the ``module:Class`` that implements it (imported on first use)."""

SETTINGS: dict[str, Any] = {
    "qlora.double-quant": True,
    "qlora.compute-dtype": "float32",
    "loraplus.lr-ratio": 16.0,
    "adalora.target-r": 4,
    "adalora.tinit": 0,
    "adalora.tfinal": 0,
    "adalora.delta-t": 1,
    "adalora.orth-reg-weight": 0.5,
    "mtlora.task-r": 4,
    "mtlora.task-modules": "o_proj,down_proj",
    "mtlora.task-layers": 2,
    "loramoe.experts": 4,
    "loramoe.top-k": 2,
    "deltalora.update-ratio": 0.5,
    "longlora.group-size": 0,
    "longlora.trainable-modules": "embed_tokens,norm",
    "loradrop.warmup-rounds": 1,
    "loradrop.threshold": 0.9,
    "loradrop.keep-layers": 0,
    "loradrop.sample-batches": 4,
    "prompt.num-virtual-tokens": 16,
    "prompt.encoder-hidden-size": 128,
    "bottleneck.size": 16,
    "bottleneck.activation": "relu",
    "lisa.layers": 2,
    "lisa.period": 1,
}
"""Every key of the methods' own sections (``AdapterMethod.settings``) with its default, in the reference's order.

A copy of the modules' declarations, so that a run config's keys of the
methods it does not choose are checked (known, at their defaults) without
importing them; a test keeps the two equal.
"""

NEEDS_STRATEGY: dict[str, str] = {"delta-lora": "delta-lora", "lora-drop": "lora-drop", "lisa": "lisa"}
"""``AdapterMethod.strategy`` of each method that has one: the strategy serves that method only (a copy, as above)."""


@cache
def get_method(name: str) -> AdapterMethod:
    """The method registered as ``name`` (its module is imported now if it was not yet)."""
    if name not in METHODS:
        raise ValueError(f"unknown adapter method '{name}'; expected one of {', '.join(METHODS)}")
    module, _, cls = METHODS[name].partition(":")
    method = getattr(importlib.import_module(module), cls)()
    if method.name != name:
        raise ValueError(f"METHODS['{name}'] is {METHODS[name]}, a class named '{method.name}'")
    return method


def all_methods() -> list[AdapterMethod]:
    """Every registered method, in registry order (imports all their modules)."""
    return [get_method(name) for name in METHODS]


def load_saved(base: PreTrainedModel, folder: Path) -> PeftModel:
    """A saved adapter folder on ``base``: by the method whose extra files it holds, else by peft's loader.

    Every method is imported first: that also registers fedlora's own peft tuners
    (bottleneck adapters), so peft can load any folder fedlora wrote.
    """
    method = next((m for m in all_methods() if m.wrote(folder)), get_method("lora"))
    return method.from_pretrained(base, folder)


__all__ = ["METHODS", "NEEDS_STRATEGY", "SETTINGS", "all_methods", "get_method", "load_saved"]
