"""Adapter methods, one module per method, selected by ``adapter.method``.

Each is a small class over a peft config (see :class:`fedlora.methods.base.AdapterMethod`);
adding a method means adding a module here and its name to the registry below,
never editing the apps or the strategies.
"""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel
from transformers import PreTrainedModel

from fedlora.methods.adalora import AdaLora
from fedlora.methods.base import AdapterMethod
from fedlora.methods.bottleneck import Bottleneck
from fedlora.methods.delta_lora import DeltaLora
from fedlora.methods.dora import Dora
from fedlora.methods.lisa import Lisa
from fedlora.methods.longlora import LongLora
from fedlora.methods.lora import Lora
from fedlora.methods.lora_fa import LoraFA
from fedlora.methods.loramoe import LoraMoE
from fedlora.methods.loraplus import LoraPlus
from fedlora.methods.mtlora import MTLora
from fedlora.methods.prompts import PrefixTuning, PromptTuning, PTuning, PTuningV2
from fedlora.methods.qlora import QLora
from fedlora.methods.vera import Vera

METHODS: dict[str, AdapterMethod] = {
    method.name: method
    for method in (
        Lora(),
        QLora(),
        Dora(),
        LoraFA(),
        LoraPlus(),
        AdaLora(),
        MTLora(),
        LoraMoE(),
        DeltaLora(),
        LongLora(),
        Vera(),
        PromptTuning(),
        PTuning(),
        PrefixTuning(),
        PTuningV2(),
        Bottleneck(),
        Lisa(),
    )
}


def load_saved(base: PreTrainedModel, folder: Path) -> PeftModel:
    """A saved adapter folder on ``base``: by the method whose extra files it holds, else by peft's loader."""
    method = next((m for m in METHODS.values() if m.wrote(folder)), METHODS["lora"])
    return method.from_pretrained(base, folder)


def get_method(name: str) -> AdapterMethod:
    """The method registered as ``name``."""
    if name not in METHODS:
        raise ValueError(f"unknown adapter method '{name}'; expected one of {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "AdapterMethod", "MTLora", "get_method", "load_saved"]
