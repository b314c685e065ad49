"""The adapter layer: a frozen module followed by a bottleneck MLP on its output, with a skip connection."""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.activations import ACT2FN

from fedlora.keys import BOTTLENECK_DOWN, BOTTLENECK_UP
from fedlora.methods.bottleneck.config import BottleneckConfig


class BottleneckLayer(nn.Module, BaseTunerLayer):
    """``base(x)`` then ``h + up(act(down(h)))`` for each active adapter, in order.

    The up-projection starts at zero, so a fresh adapter is the identity and
    the model starts as the pretrained one (Houlsby et al.'s near-identity
    initialisation, made exact as LoRA does with B = 0). It cannot be merged into
    the base weight: the non-linearity sits between the two projections.
    """

    adapter_layer_names = (BOTTLENECK_DOWN, BOTTLENECK_UP)
    other_param_names = ("activation",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BottleneckConfig) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"bottleneck adapters follow nn.Linear modules, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.bottleneck_down = nn.ModuleDict()
        self.bottleneck_up = nn.ModuleDict()
        self.activation: dict[str, str] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: BottleneckConfig) -> None:
        """Add adapter ``adapter_name``: down-projection (default ``nn.Linear`` init), up-projection at zero."""
        width = self.get_base_layer().out_features
        self.bottleneck_down[adapter_name] = nn.Linear(width, config.bottleneck_size)
        self.bottleneck_up[adapter_name] = nn.Linear(config.bottleneck_size, width)
        nn.init.zeros_(self.bottleneck_down[adapter_name].bias)
        nn.init.zeros_(self.bottleneck_up[adapter_name].weight)
        nn.init.zeros_(self.bottleneck_up[adapter_name].bias)
        self.activation[adapter_name] = config.activation
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base module's output, passed through each active adapter."""
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.bottleneck_down:
                continue
            down, up = self.bottleneck_down[name], self.bottleneck_up[name]
            hidden = ACT2FN[self.activation[name]](down(result.to(down.weight.dtype)))
            result = result + up(hidden).to(result.dtype)
        return result
