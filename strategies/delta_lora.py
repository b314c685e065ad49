"""Delta-LoRA across clients: LoRA averaged as usual, the clients' base deltas kept exactly as a residual.

Zi et al., "Delta-LoRA: Fine-Tuning High-Rank Parameters with the Delta of
Low-Rank Matrices", 2023, https://arxiv.org/abs/2309.02411, federated
(``adapter.method = "delta-lora"``, :mod:`fedlora.methods.delta_lora`).

In round t a client k starts from the base ``W0 + R`` and the global factors
(B_g, A_g), and its local steps move its base by ``λ·s·(B_k A_k − B_g A_g)``
(the per-step deltas telescope). The server averages the clients' bases
exactly without receiving them: per layer it stacks

    B = [B_R, λs·p_1 B_1, …, λs·p_K B_K, −λs·B_g],   A = [A_R; A_1; …; A_K; A_g]

so ``B·A = R + λ·s·(Σ p_k B_k A_k − B_g A_g)``, re-compressed without loss to its
numerical rank (:func:`fedlora.aggregation.compact`); this residual travels
down in every message and every party merges it into its base
(:func:`fedlora.residual.set_residual`), as FLoRA's does. The LoRA factors are
averaged by ``strategy.within`` (factors or products). Upload bytes are
LoRA's; download bytes grow with the residual's rank, by up to (K+1)·r per
round until it reaches the layer's full rank (``residual-rank-max`` in
metrics.json).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fedlora.adapter import split_residual
from fedlora.aggregation import compact, normalized_weights, stack_factors
from fedlora.config import RunConfig
from fedlora.keys import RESIDUAL_A, RESIDUAL_B, lora_pairs, module_of
from strategies.base import AdapterStrategy
from strategies.fedavg_factors import FedAvgFactors
from strategies.fedavg_products import FedAvgProducts


class DeltaLoRA(AdapterStrategy):
    """``strategy.within`` for the LoRA factors; the clients' mean base delta added to an exact residual."""

    def __init__(self, *, rate: float = 1.0, within: str = "fedavg-factors", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rate = rate
        self.math: AdapterStrategy = FedAvgProducts() if within == "fedavg-products" else FedAvgFactors()
        self.math.round_log = self.round_log

    @classmethod
    def options(cls, cfg: RunConfig) -> dict[str, Any]:
        """The base's rate λ·alpha/r and ``strategy.within``."""
        return {
            "rate": cfg.deltalora.update_ratio * cfg.adapter.alpha / cfg.adapter.r,
            "within": cfg.strategy.within,
        }

    @classmethod
    def server_optimizer_refusal(cls, cfg: RunConfig) -> str:
        """As ``strategy.within``'s: it steps the LoRA factors; the residual stays the clients' exact mean base."""
        return FedAvgProducts.server_optimizer_refusal(cfg) if cfg.strategy.within == "fedavg-products" else ""

    def aggregate_states(
        self, server_round: int, states: list[dict[str, Tensor]], weights: list[float]
    ) -> dict[str, Tensor]:
        """The LoRA factors averaged; each layer's residual plus λ·s·(Σ p_k B_k A_k − B_g A_g), compacted."""
        sent, residual = split_residual(self.global_state)
        self.math.global_state = sent
        new_state = self.math.aggregate_states(server_round, states, weights)
        coefficients = [self.rate * p for p in normalized_weights(weights)] + [-self.rate]
        ranks = []
        for a_key, b_key in lora_pairs(sent).values():
            module = module_of(a_key)
            b, a = stack_factors(
                [*(s[b_key] for s in states), sent[b_key]], [*(s[a_key] for s in states), sent[a_key]], coefficients
            )
            if module in residual:
                b, a = torch.cat([residual[module][0], b], 1), torch.cat([residual[module][1], a], 0)
            new_state[module + RESIDUAL_B], new_state[module + RESIDUAL_A] = compact(b, a)
            ranks.append(new_state[module + RESIDUAL_A].shape[0])
        if ranks:
            self.round_log[server_round]["residual-rank-max"] = max(ranks)
        return new_state
