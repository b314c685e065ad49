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
  party adds it to its frozen base weight (:func:`fedlora.residual.set_residual`);
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

from fedlora.adapter import resize_state, split_residual
from fedlora.aggregation import average_states, compact, normalized_weights, stack_factors
from fedlora.config import RunConfig
from fedlora.keys import RESIDUAL_A, RESIDUAL_B, lora_pairs, module_of
from strategies.base import AdapterStrategy, NodeProfile


class FLoRA(AdapterStrategy):
    """Exact stacking of mixed-rank factors into a residual merged into the base; fresh LoRA every round."""

    per_node = True

    @classmethod
    def server_optimizer_refusal(cls, cfg: RunConfig) -> str:
        """Refused: the global factors are fresh every round and the update goes into a growing residual."""
        return (
            "the LoRA factors are re-drawn every round and each round's update is stacked into a residual whose "
            "rank grows, so there is no fixed tensor to step along"
        )

    def __init__(self, *, scaling: float = 2.0, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scaling = scaling
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

    def aggregate_states(
        self, server_round: int, states: list[dict[str, Tensor]], weights: list[float]
    ) -> dict[str, Tensor]:
        """Add the stacked round update to the residual; average every other tensor."""
        template, residual = split_residual(self.global_state)
        pairs = lora_pairs(template)
        factor_keys = {key for pair in pairs.values() for key in pair}
        new_state = average_states(states, weights, [k for k in template if k not in factor_keys])
        coefficients = [self.scaling * p for p in normalized_weights(weights)]
        ranks = []
        for a_key, b_key in pairs.values():
            module = module_of(a_key)
            b, a = stack_factors([s[b_key] for s in states], [s[a_key] for s in states], coefficients)
            if module in residual:
                b, a = torch.cat([residual[module][0], b], 1), torch.cat([residual[module][1], a], 0)
            new_state[module + RESIDUAL_B], new_state[module + RESIDUAL_A] = compact(b, a)
            new_state[a_key], new_state[b_key] = template[a_key], torch.zeros_like(template[b_key])
            ranks.append(new_state[module + RESIDUAL_A].shape[0])
        if ranks:
            self.round_log[server_round]["residual-rank-max"] = max(ranks)
        return new_state
