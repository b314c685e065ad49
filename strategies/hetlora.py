"""HetLoRA: clients of different ranks, merged by zero-padding to the largest rank.

Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models", EMNLP 2024, https://arxiv.org/abs/2401.06432. Each client
receives the global adapter truncated to its rank (its first r_k components)
and returns rank-r_k factors; the server zero-pads them to the global rank and
averages factor by factor. With ``norm_weighting`` (the paper's
sparsity-weighted aggregation) a client's weight in a layer is its examples
times the Frobenius norm of its update ``B_k·A_k`` in that layer, so clients
whose update in a layer is small pull the average less; a norm counts for at
most ``max_weight_ratio`` times the layer's median norm, so one client with a
huge update cannot take the layer over. Without it, this is
naive zero-padding (weights by examples only). The paper's rank self-pruning
regulariser is not applied.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fedlora.adapter import resize_state
from fedlora.aggregators import PaddedMean
from fedlora.config import RunConfig, RunSettings
from strategies.base import AdapterStrategy, NodeProfile


class HetLoRA(AdapterStrategy):
    """Zero-pad every client's factors to the global rank, average them, truncate per client."""

    per_node = True
    aggregator: PaddedMean

    @classmethod
    def server_optimizer_refusal(cls, cfg: RunConfig) -> str:
        """Refused: a zero-padded component is a client's absence, not a zero update."""
        return (
            "clients of lower rank return zero-padded factors, so the average of a component only some clients "
            "train is shrunk by zeros that are not updates, and server moments would carry that bias on"
        )

    def __init__(
        self, *, norm_weighting: bool = True, max_weight_ratio: float = RunSettings.max_weight_ratio, **kwargs: Any
    ) -> None:
        super().__init__(
            max_weight_ratio=max_weight_ratio, aggregator=PaddedMean(norm_weighting, max_weight_ratio), **kwargs
        )

    @classmethod
    def options(cls, cfg: RunConfig) -> dict[str, Any]:
        """``strategy.norm-weighting``."""
        return {"norm_weighting": cfg.strategy.norm_weighting}

    def client_state(self, profile: NodeProfile) -> dict[str, Tensor]:
        """The global adapter's first ``profile.rank`` components."""
        return resize_state(self.global_state, profile.rank)

    @property
    def norm_weighting(self) -> bool:
        """Whether a client's weight in a layer is scaled by its update's norm there."""
        return self.aggregator.norm_weighting
