"""FLoRA: stack the clients' factors (exact for any mix of ranks), merge the result into the base, start afresh.

Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations", NeurIPS 2024, https://arxiv.org/abs/2409.05976.

Per round and layer the server stacks the clients' factors,
``B = [p_1 B_1, …, p_K B_K]`` and ``A = [A_1; …; A_K]``, so that
``s·B·A = Σ_k p_k · s·B_k·A_k`` exactly, whatever the clients' ranks. In the
paper every client then adds this update to its base weights and re-initialises
its LoRA module. Here, as the base never travels:

* the server keeps the sum of all rounds' updates as a **residual**
  ``B_res·A_res`` per layer (re-compressed without loss to its numerical rank,
  :func:`fedlora.aggregation.compact`) and sends it in every message; each
  party adds it to its frozen base weight (:data:`fedlora.residual.RESIDUAL`, the hook
  that merges it when a message is loaded);
* the LoRA factors it sends are **fresh**: B = 0 and A drawn as peft draws it
  (uniform ±1/√k), seeded by the round, so the model a client starts from is
  exactly base + residual;
* **α scaling**: every client's update is scaled by the global ``s = alpha/r``
  (a client of rank r_k trains the first r_k components of a rank-r adapter),
  so the strategy stacks ``p_k·s·B_k``: the residual holds the update in weight
  units. The final adapter folder stores residual and adapter as one LoRA with
  ``r = lora_alpha = R`` (scaling 1), which peft loads as is.

The cost the paper accepts is communication: the residual's rank grows by up to
Σ r_k per round (bytes-down in metrics.json shows it). It needs a full-precision
base (merging into 4-bit weights is not exact) and LoRA factors (not DoRA).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from fedlora.adapter import resize_state
from fedlora.aggregators import StackedResidual
from fedlora.config import RunConfig
from fedlora.keys import lora_pairs
from strategies.base import AdapterStrategy, NodeProfile


class FLoRA(AdapterStrategy):
    """Exact stacking of mixed-rank factors into a residual merged into the base; fresh LoRA every round.

    The maths is :class:`fedlora.aggregators.StackedResidual`; this class sends fresh factors.
    """

    per_node = True

    @classmethod
    def server_optimizer_refusal(cls, cfg: RunConfig) -> str:
        """Refused: the global factors are fresh every round and the update goes into a growing residual."""
        return (
            "the LoRA factors are re-drawn every round and each round's update is stacked into a residual whose "
            "rank grows, so there is no fixed tensor to step along"
        )

    def __init__(self, *, scaling: float = 2.0, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(aggregator=StackedResidual(scaling), **kwargs)
        self.seed = seed

    @classmethod
    def options(cls, cfg: RunConfig) -> dict[str, Any]:
        """The LoRA scaling alpha/r every client trains with, and the seed of the fresh A factors."""
        return {"scaling": cfg.adapter.alpha / cfg.adapter.r, "seed": cfg.run.seed}

    def client_state(self, profile: NodeProfile) -> dict[str, Tensor]:
        """Residual and non-LoRA tensors of the global adapter, with fresh LoRA factors of the node's rank."""
        state = resize_state(self.global_state, profile.rank)
        gen = torch.Generator().manual_seed(self.seed + 1000 * self.current_round + profile.rank)
        for a_key, b_key in lora_pairs(state).values():
            fan_in = state[a_key].shape[1]
            state[a_key] = (torch.rand(state[a_key].shape, generator=gen) * 2 - 1) / math.sqrt(fan_in)
            state[b_key] = torch.zeros_like(state[b_key])
        return state
