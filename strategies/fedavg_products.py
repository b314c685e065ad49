"""FedAvg over the LoRA products B·A, exact, then re-factorised to the adapter rank.

The aggregate FedIT should have computed: ``ΔW = Σ_k p_k · s · B_k A_k``, the
weighted mean of the clients' actual updates, as in FLoRA (Wang et al., NeurIPS
2024, https://arxiv.org/abs/2409.05976) and FlexLoRA (Bai et al., NeurIPS 2024,
https://arxiv.org/abs/2402.11505). The mean has rank up to K·r; it is cut back
to rank r by its truncated SVD (the best rank-r approximation), computed from the
factors alone (QR + SVD of a small core, see
:func:`fedlora.aggregation.product_average`). The relative truncation error is
recorded per layer and round (its mean and max also logged). Tensors that are
not LoRA factors (a classification head) are averaged directly.
"""

from __future__ import annotations

from fedlora.aggregators import ProductMean
from fedlora.config import RunConfig
from strategies.base import AdapterStrategy


class FedAvgProducts(AdapterStrategy):
    """Exact weighted average of B·A per layer, cut to rank r by SVD (:class:`fedlora.aggregators.ProductMean`)."""

    aggregator = ProductMean()

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
        return ProductMean(frozen_a=cfg.adapter.method == "lora-fa").sum_refusal
