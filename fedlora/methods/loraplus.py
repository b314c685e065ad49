"""LoRA+: B learns ``loraplus.lr-ratio`` times faster than A.

Hayou et al., "LoRA+: Efficient Low Rank Adaptation of Large Models", ICML 2024,
https://arxiv.org/abs/2402.12354. Same tensors on the wire as LoRA; only the
local optimizer differs (peft's ``create_loraplus_optimizer``).
"""

from __future__ import annotations

import torch
from peft import PeftModel
from peft.optimizers import create_loraplus_optimizer

from fedlora.config import RunConfig
from fedlora.methods.lora import Lora


class LoraPlus(Lora):
    """LoRA with per-factor learning rates."""

    name = "loraplus"

    def optimizer(self, model: PeftModel, cfg: RunConfig, lr: float) -> torch.optim.Optimizer:
        """``train.optimizer`` with B's learning rate ``lr · loraplus.lr-ratio``."""
        optimizer_cls = torch.optim.SGD if cfg.train.optimizer == "sgd" else torch.optim.AdamW
        return create_loraplus_optimizer(
            model, optimizer_cls, lr=lr, loraplus_lr_ratio=cfg.loraplus.lr_ratio, weight_decay=cfg.train.weight_decay
        )
