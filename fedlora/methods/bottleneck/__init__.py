"""Adapter tuning: bottleneck adapters after the attention and the feed-forward block of every layer.

Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", ICML 2019,
https://arxiv.org/abs/1902.00751. Each adapter maps the block output ``h`` to
``h + W_up·act(W_down·h + b_down) + b_up`` (d→m→d, m = ``bottleneck.size``), placed
on the projection that ends the block, before the residual addition and layer
norm (``o_proj``/``down_proj`` in Llama-type decoders, ``attention.output.dense``
and ``output.dense`` in BERT). ``W_up`` and ``b_up`` start at zero, so the
adapted model starts as the pretrained one.

peft does not ship these adapters, so they are a peft tuner of our own
(:mod:`.config`, :mod:`.layer`, :mod:`.model`) registered with peft when this
package is imported: ``get_peft_model``, ``save_pretrained`` and
``PeftModel.from_pretrained`` then handle them like any peft method (a user
loading a saved adapter imports this package first; ``fedlora generate`` loads through
:func:`fedlora.methods.load_saved`, which imports every method).

Federated: the down- and up-projections (weights and biases) train and
travel, plus a classification head; every strategy averages them
element-wise. The product trick of ``fedavg-products`` does not apply: the
non-linearity between the projections means no product of them is the update,
and averaging weights of a non-linear map is FedAvg's usual approximation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fedlora.config import MAX_RANK, RunConfig, opt
from fedlora.methods.base import AdapterMethod, task_type
from fedlora.methods.bottleneck.config import ACTIVATIONS, BottleneckConfig
from fedlora.methods.bottleneck.model import register
from fedlora.methods.lora import target_modules

register()


@dataclass(frozen=True)
class BottleneckSettings:
    """Houlsby bottleneck adapters (``adapter.method = "bottleneck"``)."""

    section: ClassVar[str] = "bottleneck"

    size: int = opt(
        16,
        "Bottleneck width m: each adapter projects d→m→d (2·d·m + m + d parameters).",
        check=lambda v, _: 1 <= v <= MAX_RANK,
    )
    activation: str = opt("relu", "Non-linearity between the down- and up-projection.", ACTIVATIONS)


class Bottleneck(AdapterMethod):
    """Houlsby bottleneck adapters, as a peft tuner."""

    name = "bottleneck"
    settings = BottleneckSettings
    uses = frozenset({"adapter.target-modules", "train.epochs"})

    def peft_config(self, cfg: RunConfig, task: str) -> BottleneckConfig:
        """A :class:`BottleneckConfig` of ``bottleneck.size`` and ``bottleneck.activation``."""
        return BottleneckConfig(
            task_type=task_type(task),
            target_modules=target_modules(cfg),
            bottleneck_size=cfg.bottleneck.size,
            activation=cfg.bottleneck.activation,
        )


__all__ = ["Bottleneck", "BottleneckConfig"]
