"""LoRA-FA / FFA-LoRA: A frozen at a shared random init, only B trains and travels.

Zhang et al., "LoRA-FA: Memory-efficient Low-rank Adaptation", 2023,
https://arxiv.org/abs/2308.03303; in federated learning, Sun et al., "Improving
LoRA in Privacy-preserving Federated Learning" (FFA-LoRA), ICLR 2024,
https://arxiv.org/abs/2403.12313. Every party builds A from the run's seed, so
A never travels and all clients share it; then the mean of the clients' updates
``mean(B_k)·A`` is exactly what averaging B gives: factor and product
averaging coincide. Local training uses peft's LoRA-FA optimizer.
"""

from __future__ import annotations

import torch
from peft import PeftModel
from peft.optimizers import create_lorafa_optimizer

from fedlora.config import RunConfig
from fedlora.keys import is_lora_a
from fedlora.methods.lora import LORA_OPTIONS, Lora


class LoraFA(Lora):
    """LoRA with A frozen and shared."""

    name = "lora-fa"
    uses = LORA_OPTIONS

    def freeze(self, model: PeftModel) -> None:
        """Freeze every ``lora_A``: it is the same seeded matrix on every party."""
        for name, param in model.named_parameters():
            if is_lora_a(name):
                param.requires_grad_(False)

    def optimizer(self, model: PeftModel, cfg: RunConfig, lr: float) -> torch.optim.Optimizer:
        """The LoRA-FA optimizer of peft (AdamW with B's gradient projected through the frozen A)."""
        return create_lorafa_optimizer(
            model, r=cfg.adapter.r, lora_alpha=cfg.adapter.alpha, lr=lr, weight_decay=cfg.train.weight_decay
        )
