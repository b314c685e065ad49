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
from fedlora.aggregation import average_states, product_norm, resize_rank, weighted_average
from fedlora.config import RunConfig
from fedlora.keys import lora_pairs
from fedlora.robust import capped_weights
from strategies.base import AdapterStrategy, NodeProfile


class HetLoRA(AdapterStrategy):
    """Zero-pad every client's factors to the global rank, average them, truncate per client."""

    per_node = True

    @classmethod
    def server_optimizer_refusal(cls, cfg: RunConfig) -> str:
        """Refused: a zero-padded component is a client's absence, not a zero update."""
        return (
            "clients of lower rank return zero-padded factors, so the average of a component only some clients "
            "train is shrunk by zeros that are not updates, and server moments would carry that bias on"
        )

    def __init__(self, *, norm_weighting: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.norm_weighting = norm_weighting

    @classmethod
    def options(cls, cfg: RunConfig) -> dict[str, Any]:
        """``strategy.norm-weighting``."""
        return {"norm_weighting": cfg.strategy.norm_weighting}

    def client_state(self, profile: NodeProfile) -> dict[str, Tensor]:
        """The global adapter's first ``profile.rank`` components."""
        return resize_state(self.global_state, profile.rank)

    def aggregate_states(
        self, server_round: int, states: list[dict[str, Tensor]], weights: list[float]
    ) -> dict[str, Tensor]:
        """Per layer: weighted mean of the zero-padded factors; other tensors: weighted mean."""
        pairs = lora_pairs(self.global_state)
        factor_keys = {key for pair in pairs.values() for key in pair}
        new_state = average_states(states, weights, [k for k in self.global_state if k not in factor_keys])
        for a_key, b_key in pairs.values():
            padded = [resize_rank(s[b_key], s[a_key], self.global_rank) for s in states]
            layer_weights = weights
            if self.norm_weighting:  # a norm counts for at most max-weight-ratio × the median: no client takes a layer
                norms = capped_weights([product_norm(b, a) for b, a in padded], self.max_weight_ratio)
                layer_weights = [w * n for w, n in zip(weights, norms, strict=True)]
                if sum(layer_weights) == 0:  # every update in this layer is zero: fall back to examples
                    layer_weights = weights
            new_state[b_key] = weighted_average([b for b, _ in padded], layer_weights)
            new_state[a_key] = weighted_average([a for _, a in padded], layer_weights)
        return new_state
