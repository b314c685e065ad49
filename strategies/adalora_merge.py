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

from statistics import fmean

import torch
from torch import Tensor

from fedlora.aggregation import average_states, budget_masks, masked_average
from fedlora.config import RunConfig
from fedlora.keys import LORA_A, LORA_B, LORA_E, RANK_PATTERN, is_lora_e
from fedlora.validation import rank_masks
from strategies.base import AdapterStrategy, ClientReply

KEPT = "#kept"  # suffix of the kept-indices mask added to a decoded reply


class AdaLoRAMerge(AdapterStrategy):
    """Average each AdaLoRA triplet over the clients that kept it, then cut to the clients' mean budget."""

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

    def aggregate_states(
        self, server_round: int, states: list[dict[str, Tensor]], weights: list[float]
    ) -> dict[str, Tensor]:
        """Mask-aware average of every triplet, plain average of everything else, then the budget cut."""
        e_keys = [k for k in self.global_state if is_lora_e(k)]
        triplet_keys = {k.replace(LORA_E, part) for k in e_keys for part in (LORA_A, LORA_B, LORA_E)}
        new_state = average_states(states, weights, [k for k in self.global_state if k not in triplet_keys])
        for e_key in e_keys:
            masks = [s[e_key + KEPT] for s in states]
            a_key, b_key = e_key.replace(LORA_E, LORA_A), e_key.replace(LORA_E, LORA_B)
            no_vote = torch.zeros_like(self.global_state[e_key])  # an index nobody kept stays pruned
            new_state[e_key] = masked_average([s[e_key] for s in states], masks, weights, no_vote, dim=0)
            new_state[a_key] = masked_average([s[a_key] for s in states], masks, weights, self.global_state[a_key])
            new_state[b_key] = masked_average(
                [s[b_key] for s in states], masks, weights, self.global_state[b_key], dim=1
            )
        budget = round(fmean(sum(int(s[k + KEPT].sum()) for k in e_keys) for s in states))
        kept = budget_masks({k: new_state[k] for k in e_keys}, budget)
        for e_key, mask in kept.items():
            new_state[e_key] = new_state[e_key] * mask.view_as(new_state[e_key])
        self.round_log[server_round]["rank-budget"] = budget
        return new_state
