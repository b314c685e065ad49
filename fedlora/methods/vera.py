"""VeRA: frozen random low-rank matrices shared by all layers; only scaling vectors train.

Kopiczko et al., "VeRA: Vector-based Random Matrix Adaptation", ICLR 2024,
https://arxiv.org/abs/2310.11454. The update is ``Λ_b·B·Λ_d·A`` with A and B
random and frozen, generated from ``projection_prng_key`` (the run's seed) on
every client and on the server, never sent (``save_projection=False``: peft
regenerates them when it loads the saved adapter too). Only the vectors
``vera_lambda_b`` (d) and ``vera_lambda_d`` (r) travel, plus a classification
head if there is one.
"""

from __future__ import annotations

from peft import VeraConfig

from fedlora.config import RunConfig
from fedlora.methods.base import AdapterMethod, task_type
from fedlora.methods.lora import target_modules


class Vera(AdapterMethod):
    """peft's VeRA with projections regenerated from the run's seed."""

    name = "vera"
    uses = frozenset(
        {"adapter.r", "adapter.dropout", "adapter.target-modules", "model.load-in-8bit", "train.epochs"}
    )  # no alpha: its scaling vectors train instead

    def peft_config(self, cfg: RunConfig, task: str) -> VeraConfig:
        """A peft ``VeraConfig`` keyed to ``run.seed``."""
        return VeraConfig(
            task_type=task_type(task),
            r=cfg.adapter.r,
            target_modules=target_modules(cfg),
            vera_dropout=cfg.adapter.dropout,
            projection_prng_key=cfg.run.seed,
            save_projection=False,
        )
