"""LoRA+: B learns ``loraplus.lr-ratio`` times faster than A.

Hayou et al., "LoRA+: Efficient Low Rank Adaptation of Large Models", ICML 2024,
https://arxiv.org/abs/2402.12354. Same tensors on the wire as LoRA; only the
local optimizer differs (peft's ``create_loraplus_optimizer``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from peft import PeftModel
from peft.optimizers import create_loraplus_optimizer

from fedlora.config import RunConfig, opt
from fedlora.methods.lora import Lora


@dataclass(frozen=True)
class LoraPlusSettings:
    """LoRA+ learning rates (``adapter.method='loraplus'``)."""

    section: ClassVar[str] = "loraplus"

    lr_ratio: float = opt(16.0, "Learning rate of B divided by that of A.", check=lambda v, _: 1 <= v < math.inf)


class LoraPlus(Lora):
    """LoRA with per-factor learning rates."""

    name = "loraplus"
    settings = LoraPlusSettings

    def optimizer(self, model: PeftModel, cfg: RunConfig, lr: float) -> torch.optim.Optimizer:
        """``train.optimizer`` with B's learning rate ``lr · loraplus.lr-ratio``."""
        optimizer_cls = torch.optim.SGD if cfg.train.optimizer == "sgd" else torch.optim.AdamW
        return create_loraplus_optimizer(
            model, optimizer_cls, lr=lr, loraplus_lr_ratio=cfg.loraplus.lr_ratio, weight_decay=cfg.train.weight_decay
        )
