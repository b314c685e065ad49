"""Aggregators: the server's maths as small objects, apart from Flower's orchestration.

An :class:`Aggregator` turns the accepted clients' states and weights into the
new global state, ``aggregate(template, states, weights) -> AggregateResult``,
and says whether that is the clients' weighted mean (:attr:`Aggregator.sum_refusal`
empty): then a secure sum of the updates, all that secure aggregation and
differential privacy leave the server, computes it. Strategies in
``strategies/`` pick one and add the Flower glue (sampling, validation, bytes,
profiles, resume: :class:`strategies.base.AdapterStrategy`); a strategy that
splits the adapter into scopes (MTLoRA, FedSA, local-only) gives the aggregator
only the tensors that travel, and states that hold only their clients' scopes.

The rules every aggregator keeps, so that scoped strategies need no per-scope
calls:

* the result holds every tensor of ``template`` (what was sent: the global
  adapter, with its residual when there is one) and nothing else;
* a tensor is aggregated over the states that hold it, with their weights (a
  group's tensors over that group's clients); a tensor no state holds keeps the
  template's value;
* ``diagnostics`` are JSON-serialisable per-round values (truncation errors, a
  residual's rank), which the strategy writes to the round's log.

The tensor maths itself is :mod:`fedlora.aggregation`'s pure functions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from statistics import fmean
from typing import Any, Protocol

import torch
from torch import Tensor

from fedlora.aggregation import (
    budget_masks,
    compact,
    masked_average,
    normalized_weights,
    product_average,
    product_norm,
    resize_rank,
    stack_factors,
    weighted_average,
)
from fedlora.config import RunSettings
from fedlora.keys import LORA_A, LORA_B, LORA_E, RESIDUAL_A, RESIDUAL_B, is_lora_a, is_lora_e, lora_pairs, module_of
from fedlora.residual import split_residual
from fedlora.robust import capped_weights

KEPT = "#kept"  # suffix of an AdaLoRA reply's kept-indices mask (strategies.adalora_merge adds it when decoding)
NOT_A_MEAN = "its aggregate is not the weighted mean of the clients' tensors, so it needs each of them"


@dataclass(frozen=True)
class AggregateResult:
    """The new global state and what the round's log records about how it was made."""

    state: dict[str, Tensor]
    diagnostics: dict[str, Any] = field(default_factory=dict)


class Aggregator(Protocol):
    """The aggregation maths of one strategy (or one scope of it); see the module docstring for the rules."""

    @property
    def sum_refusal(self) -> str:
        """Why the aggregate is not the states' weighted mean ("" when it is: a secure sum can compute it)."""
        ...

    def aggregate(
        self, template: Mapping[str, Tensor], states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]
    ) -> AggregateResult:
        """The new global state from the clients' states (float32) and weights."""
        ...


def mean_by_key(
    template: Mapping[str, Tensor],
    states: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
    keys: Sequence[str],
) -> dict[str, Tensor]:
    """Each of ``keys`` averaged over the states holding it (their weights renormalised); else the template's."""
    out = {}
    for key in keys:
        held = [(s[key], w) for s, w in zip(states, weights, strict=True) if key in s]
        out[key] = weighted_average(*zip(*held, strict=True)) if held else template[key]
    return out


def members(
    key: str, states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]
) -> tuple[list[Mapping[str, Tensor]], list[float]]:
    """The states holding tensor ``key`` and their weights."""
    held = [(s, w) for s, w in zip(states, weights, strict=True) if key in s]
    return [s for s, _ in held], [w for _, w in held]


def split_layers(template: Mapping[str, Tensor]) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """The template's LoRA layers (``layer -> (A key, B key)``) and its other tensors (a head, magnitudes)."""
    pairs = lora_pairs(template)
    factors = {key for pair in pairs.values() for key in pair}
    return pairs, [k for k in template if k not in factors]


def in_order(template: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` in the template's key order, then any key the template lacks (a new residual)."""
    return {**{k: state[k] for k in template if k in state}, **state}


class FactorMean:
    """FedIT: every tensor, A and B alike, averaged on its own (a weighted mean, so a secure sum computes it)."""

    sum_refusal = ""

    def aggregate(
        self, template: Mapping[str, Tensor], states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]
    ) -> AggregateResult:
        """Key-wise weighted mean."""
        return AggregateResult(mean_by_key(template, states, weights, list(template)))


@dataclass(frozen=True)
class ProductMean:
    """The exact weighted mean of B·A per layer, cut to the template's rank by SVD; other tensors averaged.

    ``frozen_a``: A is frozen and shared (LoRA-FA), so mean(B_k·A) = mean(B_k)·A
    is a mean of the B's and a secure sum computes it.
    """

    frozen_a: bool = False

    @property
    def sum_refusal(self) -> str:
        """Refused unless A is frozen and shared."""
        if self.frozen_a:
            return ""
        return (
            "the mean of the products B_k·A_k needs each client's factors (it is not a function of the sums of the "
            "A's and B's); with adapter.method=lora-fa A is frozen and shared, and it is"
        )

    def aggregate(
        self, template: Mapping[str, Tensor], states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]
    ) -> AggregateResult:
        """Product-average every LoRA layer over the states holding it; average every other tensor.

        Diagnostics: the relative truncation error of the rank cut per layer, and its mean and max.
        """
        pairs, others = split_layers(template)
        state = mean_by_key(template, states, weights, others)
        errors = {}
        for layer, (a_key, b_key) in pairs.items():
            held, held_weights = members(a_key, states, weights)
            if not held:
                state[a_key], state[b_key] = template[a_key], template[b_key]
                continue
            rank = template[a_key].shape[0]
            result = product_average([s[b_key] for s in held], [s[a_key] for s in held], held_weights, rank)
            state[a_key], state[b_key] = result.a, result.b
            errors[layer] = result.truncation_error
        diagnostics: dict[str, Any] = {}
        if errors:
            diagnostics = {
                "truncation-error-mean": fmean(errors.values()),
                "truncation-error-max": max(errors.values()),
                "truncation-error-per-layer": errors,
            }
        return AggregateResult(in_order(template, state), diagnostics)


def within_aggregator(name: str, frozen_a: bool = False) -> FactorMean | ProductMean:
    """The aggregator ``strategy.within`` names: ``fedavg-factors`` or ``fedavg-products``."""
    return ProductMean(frozen_a) if name == "fedavg-products" else FactorMean()


@dataclass(frozen=True)
class PaddedMean:
    """HetLoRA: factors zero-padded to the template's rank and averaged; optionally weighted by update norm.

    With ``norm_weighting`` a client's weight in a layer is its weight times
    ``‖B_k·A_k‖_F``, a norm counting for at most ``max_weight_ratio`` times the
    layer's median (so no client takes a layer over).
    """

    norm_weighting: bool = True
    max_weight_ratio: float = RunSettings.max_weight_ratio
    sum_refusal = NOT_A_MEAN

    def aggregate(
        self, template: Mapping[str, Tensor], states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]
    ) -> AggregateResult:
        """Per layer: weighted mean of the zero-padded factors; other tensors: weighted mean."""
        pairs, others = split_layers(template)
        state = mean_by_key(template, states, weights, others)
        rank = max((t.shape[0] for k, t in template.items() if is_lora_a(k)), default=0)
        for a_key, b_key in pairs.values():
            padded = [resize_rank(s[b_key], s[a_key], rank) for s in states]
            layer_weights = list(weights)
            if self.norm_weighting:
                norms = capped_weights([product_norm(b, a) for b, a in padded], self.max_weight_ratio)
                layer_weights = [w * n for w, n in zip(weights, norms, strict=True)]
                if sum(layer_weights) == 0:  # every update in this layer is zero: fall back to the weights
                    layer_weights = list(weights)
            state[b_key] = weighted_average([b for b, _ in padded], layer_weights)
            state[a_key] = weighted_average([a for _, a in padded], layer_weights)
        return AggregateResult(in_order(template, state))


def grow_residual(
    residual: Mapping[str, tuple[Tensor, Tensor]], module: str, b: Tensor, a: Tensor
) -> tuple[Tensor, Tensor]:
    """``module``'s residual plus the update ``b·a``, compacted to its numerical rank (B, A)."""
    if module in residual:
        b, a = torch.cat([residual[module][0], b], 1), torch.cat([residual[module][1], a], 0)
    return compact(b, a)


@dataclass(frozen=True)
class StackedResidual:
    """FLoRA: the clients' factors stacked (exact for any ranks) into the residual; LoRA restarts from the template.

    ``scaling`` is the LoRA ``alpha/r`` every client trains with, so the
    residual holds the update in weight units. Diagnostics: the residual's
    largest rank.
    """

    scaling: float = 2.0
    sum_refusal = NOT_A_MEAN

    def aggregate(
        self, template: Mapping[str, Tensor], states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]
    ) -> AggregateResult:
        """Add the stacked round update to each layer's residual; average every other tensor."""
        sent, residual = split_residual(template)
        pairs, others = split_layers(sent)
        state = mean_by_key(sent, states, weights, others)
        coefficients = [self.scaling * p for p in normalized_weights(weights)]
        for a_key, b_key in pairs.values():
            module = module_of(a_key)
            b, a = stack_factors([s[b_key] for s in states], [s[a_key] for s in states], coefficients)
            state[module + RESIDUAL_B], state[module + RESIDUAL_A] = grow_residual(residual, module, b, a)
            state[a_key], state[b_key] = sent[a_key], torch.zeros_like(sent[b_key])
        return AggregateResult(in_order(template, state), residual_rank(state))


@dataclass(frozen=True)
class DeltaResidual:
    """Delta-LoRA: ``factors`` aggregates the LoRA factors; the clients' mean base delta goes into the residual.

    Per layer the residual grows by ``rate·(Σ p_k B_k A_k − B_g A_g)`` (``rate``
    = λ·alpha/r, ``B_g A_g`` the template's factors), stacked and compacted
    without loss. A secure sum cannot compute it (it needs each client's product).
    """

    factors: FactorMean | ProductMean
    rate: float = 1.0
    sum_refusal = NOT_A_MEAN

    def aggregate(
        self, template: Mapping[str, Tensor], states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]
    ) -> AggregateResult:
        """The factors' aggregate, and each layer's residual grown by the mean base delta."""
        sent, residual = split_residual(template)
        inner = self.factors.aggregate(sent, states, weights)
        state = dict(inner.state)
        coefficients = [self.rate * p for p in normalized_weights(weights)] + [-self.rate]
        for a_key, b_key in lora_pairs(sent).values():
            module = module_of(a_key)
            b, a = stack_factors(
                [*(s[b_key] for s in states), sent[b_key]], [*(s[a_key] for s in states), sent[a_key]], coefficients
            )
            state[module + RESIDUAL_B], state[module + RESIDUAL_A] = grow_residual(residual, module, b, a)
        return AggregateResult(state, {**inner.diagnostics, **residual_rank(state)})


def residual_rank(state: Mapping[str, Tensor]) -> dict[str, int]:
    """``residual-rank-max``: the largest rank of a residual in ``state`` (nothing when it has none)."""
    ranks = [t.shape[0] for k, t in state.items() if k.endswith(RESIDUAL_A)]
    return {"residual-rank-max": max(ranks)} if ranks else {}


class MaskedBudget:
    """AdaLoRA: each triplet index averaged over the clients that kept it, then cut to the clients' mean budget.

    Each state carries, per ``lora_E`` tensor, its kept-indices mask under
    ``<key>#kept`` (:data:`KEPT`). An index no client kept stays pruned. The
    budget is as many triplets, over all layers, as the clients kept on
    average, chosen by ``|Λ|``. Diagnostics: that budget.
    """

    sum_refusal = NOT_A_MEAN

    def aggregate(
        self, template: Mapping[str, Tensor], states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]
    ) -> AggregateResult:
        """Mask-aware average of every triplet, plain average of everything else, then the budget cut."""
        e_keys = [k for k in template if is_lora_e(k)]
        triplet_keys = {k.replace(LORA_E, part) for k in e_keys for part in (LORA_A, LORA_B, LORA_E)}
        state = mean_by_key(template, states, weights, [k for k in template if k not in triplet_keys])
        for e_key in e_keys:
            masks = [s[e_key + KEPT] for s in states]
            a_key, b_key = e_key.replace(LORA_E, LORA_A), e_key.replace(LORA_E, LORA_B)
            no_vote = torch.zeros_like(template[e_key])  # an index nobody kept stays pruned
            state[e_key] = masked_average([s[e_key] for s in states], masks, weights, no_vote, dim=0)
            state[a_key] = masked_average([s[a_key] for s in states], masks, weights, template[a_key])
            state[b_key] = masked_average([s[b_key] for s in states], masks, weights, template[b_key], dim=1)
        budget = round(fmean(sum(int(s[k + KEPT].sum()) for k in e_keys) for s in states))
        for e_key, mask in budget_masks({k: state[k] for k in e_keys}, budget).items():
            state[e_key] = state[e_key] * mask.view_as(state[e_key])
        return AggregateResult(in_order(template, state), {"rank-budget": budget})
