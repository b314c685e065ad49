"""FedAvg over the adapter factors (FedIT; the FlowerTune baseline).

Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning"
(FedIT), ICASSP 2024, https://arxiv.org/abs/2305.05644. Every tensor, A and B
alike, is averaged on its own, weighted by ``num-examples``. Cheap and simple,
but the global update ``mean(B)·mean(A)`` differs from the mean of the clients'
updates ``mean(B·A)``; :class:`strategies.fedavg_products.FedAvgProducts` is exact.
"""

from __future__ import annotations

from fedlora.aggregators import FactorMean
from fedlora.config import RunConfig
from strategies.base import AdapterStrategy


class FedAvgFactors(AdapterStrategy):
    """Weighted average of every adapter tensor, factor by factor (:class:`fedlora.aggregators.FactorMean`)."""

    aggregator = FactorMean()

    @classmethod
    def sum_refusal(cls, cfg: RunConfig) -> str:
        """None: the weighted mean of each tensor is a weighted sum, all secure aggregation reveals."""
        return cls.aggregator.sum_refusal
