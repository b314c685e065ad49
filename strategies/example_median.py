"""Example of a custom strategy (docs/strategies.md): the coordinate-wise median of every adapter tensor.

Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
Rates", ICML 2018, https://arxiv.org/abs/1803.01498. The median ignores a
minority of arbitrarily bad clients that the validation checks let through
(finite, right shape, but wrong). Like FedAvg over factors it is not exact for
products B·A; it shows the API, not a recommendation. Select it with
``strategy.name = "strategies.example_median:FactorMedian"``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from strategies.base import AdapterStrategy


class FactorMedian(AdapterStrategy):
    """Element-wise median over the accepted clients (weights are ignored)."""

    def aggregate_states(
        self, server_round: int, states: list[dict[str, Tensor]], weights: list[float]
    ) -> dict[str, Tensor]:
        """Median of each tensor over the clients."""
        return {key: torch.stack([s[key] for s in states]).median(dim=0).values for key in self.global_state}
