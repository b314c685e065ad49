"""FedAvg over the LoRA products B·A, exact, then re-factorised to the adapter rank.

The aggregate FedIT should have computed: ``ΔW = Σ_k p_k · s · B_k A_k``, the
weighted mean of the clients' actual updates, as in FLoRA (Wang et al., NeurIPS
2024, https://arxiv.org/abs/2409.05976) and FlexLoRA (Bai et al., NeurIPS 2024,
https://arxiv.org/abs/2402.11505). The mean has rank up to K·r; it is cut back
to rank r by its truncated SVD (the best rank-r approximation), computed from the
factors alone (QR + SVD of a small core, see
:func:`fedlora.aggregation.product_average`). The relative truncation error is
logged per layer and recorded per round. Tensors that are not LoRA factors (a
classification head) are averaged directly.
"""

from __future__ import annotations

from logging import DEBUG, INFO
from statistics import mean

from flwr.common.logger import log
from torch import Tensor

from fedlora.aggregation import average_states, product_average
from fedlora.config import RunConfig
from fedlora.keys import lora_pairs
from strategies.base import AdapterStrategy


class FedAvgProducts(AdapterStrategy):
    """Exact weighted average of B·A per layer, truncated to rank r by SVD."""

    @classmethod
    def server_optimizer_refusal(cls, cfg: RunConfig) -> str:
        """Refused: consecutive aggregates are factorised in different bases (docs/strategies.md)."""
        return (
            "its aggregate is re-factorised by an SVD every round, so A and B of two rounds are in different bases "
            "(rotated, signs flipped) and their difference is not an update; a step on the products B·A would need "
            "dense d×k moments per layer"
        )

    @classmethod
    def sum_refusal(cls, cfg: RunConfig) -> str:
        """Only with LoRA-FA: A is frozen and shared, so mean(B_k·A) = mean(B_k)·A, a sum of the B's."""
        if cfg.adapter.method == "lora-fa":
            return ""
        return (
            "the mean of the products B_k·A_k needs each client's factors (it is not a function of the sums of the "
            "A's and B's); with adapter.method=lora-fa A is frozen and shared, and it is"
        )

    def aggregate_states(
        self, server_round: int, states: list[dict[str, Tensor]], weights: list[float]
    ) -> dict[str, Tensor]:
        """Product-average every LoRA layer; average every other tensor."""
        pairs = lora_pairs(self.global_state)
        factor_keys = {key for pair in pairs.values() for key in pair}
        other_keys = [key for key in self.global_state if key not in factor_keys]
        new_state = average_states(states, weights, other_keys)
        errors = {}
        for layer, (a_key, b_key) in pairs.items():
            rank = self.global_state[a_key].shape[0]
            result = product_average([s[b_key] for s in states], [s[a_key] for s in states], weights, rank)
            new_state[a_key], new_state[b_key] = result.a, result.b
            errors[layer] = result.truncation_error
            log(DEBUG, "round %d: %s truncation error %.4f", server_round, layer, result.truncation_error)
        if errors:
            log(
                INFO,
                "round %d: rank-%d truncation error over %d layers: mean %.4f, max %.4f",
                server_round,
                rank,
                len(errors),
                mean(errors.values()),
                max(errors.values()),
            )
            record = self.round_log[server_round]
            record["truncation-error-mean"] = mean(errors.values())
            record["truncation-error-max"] = max(errors.values())
            record["truncation-error-per-layer"] = errors
        return new_state
