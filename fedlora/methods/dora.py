"""DoRA: LoRA on the direction of each weight, plus a trainable magnitude vector.

Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024,
https://arxiv.org/abs/2402.09353. A, B and the per-output magnitude
(``lora_magnitude_vector``) train and travel; the magnitude is averaged, the
directions (A, B) go through the chosen strategy's factor or product averaging.
"""

from __future__ import annotations

from peft import LoraConfig

from fedlora.config import RunConfig
from fedlora.methods.base import task_type
from fedlora.methods.lora import Lora


class Dora(Lora):
    """peft's LoRA with ``use_dora=True``."""

    name = "dora"

    def peft_config(self, cfg: RunConfig, task: str) -> LoraConfig:
        """LoraConfig with weight decomposition."""
        return LoraConfig(task_type=task_type(task), use_dora=True, **self.lora_kwargs(cfg))
