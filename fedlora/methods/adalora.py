"""AdaLoRA: LoRA as an SVD-like triplet P·Λ·Q whose rank budget moves to the layers that need it.

Zhang et al., "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient
Fine-Tuning", ICLR 2023, https://arxiv.org/abs/2303.10512. Each target layer
trains ``lora_A`` (Q, r×k), ``lora_E`` (Λ, r singular values) and ``lora_B``
(P, d×r); peft's rank allocator scores the triplets by sensitivity and zeroes
the singular values of the least important ones until the budget
``adalora.target-r`` × layers is reached.

Federated, the schedule runs over the whole federation's steps: round t's local
step i is global step (t-1)·``train.local-steps`` + i. The allocator's
importance averages are reset for every client (a cached model serves many), and
each reply carries the client's rank pattern, so the server can merge triplets
index by index over the clients that kept them
(:class:`strategies.adalora_merge.AdaLoRAMerge`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from peft import AdaLoraConfig, PeftModel

from fedlora.config import RunConfig, opt
from fedlora.keys import PEFT_PREFIX
from fedlora.methods.base import task_type
from fedlora.methods.lora import LORA_OPTIONS, Lora, target_modules


@dataclass(frozen=True)
class AdaLoraSettings:
    """AdaLoRA's rank budget (``adapter.method='adalora'``; ``adapter.r`` is the initial rank).

    The schedule counts federated steps: round t's local step i is step
    (t-1)·``train.local-steps`` + i of ``num-server-rounds``·``train.local-steps``.
    """

    section: ClassVar[str] = "adalora"

    target_r: int = opt(
        4, "Average rank per layer once the budget is cut.", check=lambda v, cfg: 1 <= v <= cfg.adapter.r
    )
    tinit: int = opt(0, "Steps of warm-up before ranks are cut.", check=lambda v, _: v >= 0)
    tfinal: int = opt(
        0,
        "Final steps with a fixed rank pattern.",
        check=lambda v, cfg: v >= 0 and cfg.adalora.tinit + v < cfg.run.num_server_rounds * cfg.train.local_steps,
    )
    delta_t: int = opt(1, "Steps between two budget allocations.", check=lambda v, _: v >= 1)
    orth_reg_weight: float = opt(
        0.5, "Weight of the orthogonality regulariser on P and Q.", check=lambda v, _: 0 <= v < math.inf
    )


class AdaLora(Lora):
    """peft's AdaLoRA with a federated step schedule."""

    name = "adalora"
    settings = AdaLoraSettings
    uses = LORA_OPTIONS - {"train.epochs"}  # its rank schedule counts `train.local-steps`

    def peft_config(self, cfg: RunConfig, task: str) -> AdaLoraConfig:
        """An ``AdaLoraConfig`` whose ``total_step`` covers every round."""
        return AdaLoraConfig(
            task_type=task_type(task),
            init_r=cfg.adapter.r,
            target_r=cfg.adalora.target_r,
            tinit=cfg.adalora.tinit,
            tfinal=cfg.adalora.tfinal,
            deltaT=cfg.adalora.delta_t,
            orth_reg_weight=cfg.adalora.orth_reg_weight,
            total_step=cfg.run.num_server_rounds * cfg.train.local_steps,
            lora_alpha=cfg.adapter.alpha,
            lora_dropout=cfg.adapter.dropout,
            target_modules=target_modules(cfg),
        )

    def step_hook(self, model: PeftModel, cfg: RunConfig, server_round: int) -> Callable[[int], None]:
        """Forget the previous client's importance scores and pattern; allocate the budget after every step."""
        model.base_model.rankallocator.reset_ipt()
        model.peft_config[model.active_adapter].rank_pattern = None
        offset = (server_round - 1) * cfg.train.local_steps
        return lambda step: model.base_model.update_and_allocate(offset + step)

    def rank_pattern(self, model: PeftModel) -> dict[str, list[bool]]:
        """The allocator's pattern, re-keyed from the inner model's names to our state's ``lora_E`` names."""
        pattern = model.peft_config[model.active_adapter].rank_pattern or {}
        return {PEFT_PREFIX + name: list(kept) for name, kept in pattern.items()}
