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

from fedlora.aggregators import DeltaResidual, within_aggregator
from fedlora.config import RunConfig
from strategies.base import AdapterStrategy
from strategies.fedavg_products import FedAvgProducts


class DeltaLoRA(AdapterStrategy):
    """``strategy.within`` for the LoRA factors; the clients' mean base delta added to an exact residual.

    The maths is :class:`fedlora.aggregators.DeltaResidual` around ``strategy.within``'s aggregator.
    """

    def __init__(self, *, rate: float = 1.0, within: str = "fedavg-factors", **kwargs: Any) -> None:
        super().__init__(aggregator=DeltaResidual(within_aggregator(within), rate), **kwargs)

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
