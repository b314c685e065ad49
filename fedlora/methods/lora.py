"""LoRA: a trainable low-rank update ``(alpha / r)·B·A`` beside each frozen target weight.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022,
https://arxiv.org/abs/2106.09685. A (r×k, random) and B (d×r, zero) train and
travel; for classification, so does the new head (peft's ``modules_to_save``).
"""

from __future__ import annotations

from typing import Any

from peft import LoraConfig

from fedlora.config import RunConfig
from fedlora.methods.base import AdapterMethod, task_type

LORA_OPTIONS = frozenset(
    {"adapter.r", "adapter.alpha", "adapter.dropout", "adapter.target-modules", "model.load-in-8bit", "train.epochs"}
)
"""The shared options the LoRA family reads (``AdapterMethod.uses``); a variant narrows or widens it."""


def target_modules(cfg: RunConfig) -> list[str] | None:
    """``adapter.target-modules`` as a list; ``None`` lets peft pick the architecture's default."""
    return [m.strip() for m in cfg.adapter.target_modules.split(",") if m.strip()] or None


class Lora(AdapterMethod):
    """Plain LoRA, and the base of the LoRA variants."""

    name = "lora"
    uses = LORA_OPTIONS | {"adapter.rank-tiers"}  # a client of a lower rank trains its factors zero-padded

    def lora_kwargs(self, cfg: RunConfig) -> dict[str, Any]:
        """LoraConfig arguments shared by the LoRA family."""
        return {
            "r": cfg.adapter.r,
            "lora_alpha": cfg.adapter.alpha,
            "lora_dropout": cfg.adapter.dropout,
            "target_modules": target_modules(cfg),
        }

    def peft_config(self, cfg: RunConfig, task: str) -> LoraConfig:
        """A peft ``LoraConfig``."""
        return LoraConfig(task_type=task_type(task), **self.lora_kwargs(cfg))
