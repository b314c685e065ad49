"""Mask-aware merging of AdaLoRA triplets under a global rank budget.

AdaLoRA (Zhang et al., ICLR 2023, https://arxiv.org/abs/2303.10512) trains per
layer ``P·Λ·Q`` (``lora_B``, ``lora_E``, ``lora_A``) and prunes triplets by
zeroing their singular value in Λ. Averaging such updates naively treats a
pruned triplet as a zero vote. Here each reply carries its rank pattern
(a ConfigRecord ``rank-pattern``: per ``lora_E`` tensor, which indices are
kept), checked against its tensors (a pruned index must have Λ = 0). Index i of
a layer is averaged over the clients that kept it, weighted by examples
(:func:`fedlora.aggregation.masked_average`); an index no client kept stays
pruned. The global adapter then keeps the clients' budget: as many triplets in
all layers together as the clients kept on average, chosen by |Λ|
(:func:`fedlora.aggregation.budget_masks`); the others get Λ = 0.
"""

from __future__ import annotations

from torch import Tensor

from fedlora.aggregators import KEPT, MaskedBudget
from fedlora.config import RunConfig
from fedlora.keys import RANK_PATTERN
from fedlora.validation import rank_masks
from strategies.base import AdapterStrategy, ClientReply


class AdaLoRAMerge(AdapterStrategy):
    """Average each AdaLoRA triplet over the clients that kept it, then cut to the clients' mean budget.

    The maths is :class:`fedlora.aggregators.MaskedBudget`; this class reads each reply's rank pattern.
    """

    aggregator = MaskedBudget()

    @classmethod
    def server_optimizer_refusal(cls, cfg: RunConfig) -> str:
        """Refused: pruned entries are masked out of the average, and momentum would revive them."""
        return (
            "entries a client pruned are left out of the average and the budget cut zeroes entries every round, "
            "so a step along the difference (and its momentum) would revive pruned ranks"
        )

    def decode_reply(self, reply: ClientReply) -> tuple[dict[str, Tensor], float]:
        """The reply's tensors plus, per ``lora_E`` tensor, its kept-indices mask under ``<key>#kept``."""
        state, weight = super().decode_reply(reply)
        pattern = reply.content.config_records.get(RANK_PATTERN) if reply.content else None
        masks = rank_masks(state, dict(pattern) if pattern is not None else {})
        return {**state, **{key + KEPT: mask for key, mask in masks.items()}}, weight
