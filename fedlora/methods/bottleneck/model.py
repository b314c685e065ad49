"""The peft tuner that injects bottleneck adapters, and its registration with peft."""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from fedlora.keys import BOTTLENECK_PREFIX
from fedlora.methods.bottleneck.config import DEFAULT_TARGETS, PEFT_TYPE, BottleneckConfig
from fedlora.methods.bottleneck.layer import BottleneckLayer


class BottleneckModel(BaseTuner):
    """Replaces each target module by a :class:`BottleneckLayer` around it (peft's tuner contract)."""

    prefix = BOTTLENECK_PREFIX
    tuner_layer_cls = BottleneckLayer
    target_module_mapping = DEFAULT_TARGETS

    def _create_and_replace(
        self,
        peft_config: BottleneckConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        if isinstance(target, BottleneckLayer):
            target.update_layer(adapter_name, peft_config)
            return
        new_module = BottleneckLayer(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)


def register() -> None:
    """Make peft know ``peft_type = "BOTTLENECK"``: ``get_peft_model`` and ``PeftModel.from_pretrained`` then work.

    peft's own ``register_peft_method`` accepts only members of its ``PeftType``
    enum, which cannot be extended; it fills these three tables, and so does
    this, keyed by the plain string (a ``PeftType`` is a ``str``, so lookups by
    either agree). Idempotent.
    """
    PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = BottleneckConfig
    PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = BottleneckModel
    PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = BOTTLENECK_PREFIX
