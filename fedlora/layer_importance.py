"""Which layers to keep training, from per-layer importance scores: the server's choice in LoRA-drop.

Zhou et al., "LoRA-drop: Efficient LoRA Parameters Pruning based on Output
Evaluation", 2024, https://arxiv.org/abs/2402.07721. A layer's importance is the
mean squared norm of its LoRA output ‖ΔW·x‖² over a data sample; normalised over
the layers, the most important ones whose shares add up to a threshold are kept
(or the top n); the dropped layers' factors are zeroed. Pure functions on plain numbers and
states, tested directly.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import TypeVar

import torch
from torch import Tensor

from fedlora.keys import is_lora_a, is_lora_b, module_of

T = TypeVar("T")


def normalised(importance: Mapping[str, float]) -> dict[str, float]:
    """Each layer's share of the total importance (all equal when the total is 0: nothing tells them apart)."""
    total = math.fsum(importance.values())
    if total <= 0:
        return {layer: 1 / len(importance) for layer in importance}
    return {layer: value / total for layer, value in importance.items()}


def mean_importance(reports: Sequence[Mapping[str, float]], weights: Sequence[float]) -> dict[str, float]:
    """The weighted mean of the clients' importance reports, layer by layer (weights: their example counts)."""
    total = math.fsum(weights)
    return {
        layer: math.fsum(w * r[layer] for r, w in zip(reports, weights, strict=True)) / total for layer in reports[0]
    }


def choose_layers(importance: Mapping[str, float], threshold: float, top_n: int = 0) -> list[str]:
    """The layers to keep, most important first.

    The top ``top_n`` when it is positive, else the fewest whose normalised
    importance adds up to at least ``threshold``. Ties are broken by layer
    name, so every party and every rerun chooses the same set.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    shares = normalised(importance)
    ranked = sorted(shares, key=lambda layer: (-shares[layer], layer))
    if top_n > 0:
        return ranked[:top_n]
    kept, cumulative = [], 0.0
    for layer in ranked:
        kept.append(layer)
        cumulative += shares[layer]
        if cumulative >= threshold - 1e-9:  # a threshold of 1 keeps every layer despite rounding
            break
    return kept


def is_factor(key: str) -> bool:
    """Whether ``key`` is a LoRA factor (A or B): what a layer drop removes."""
    return is_lora_a(key) or is_lora_b(key)


def lora_layers(keys: Iterable[str]) -> list[str]:
    """The LoRA layers (module names) among tensor ``keys``, sorted: the order importance reports are read in."""
    return sorted({module_of(key) for key in keys if is_factor(key)})


def layers_state(state: Mapping[str, T], layers: Collection[str]) -> dict[str, T]:
    """What trains when only ``layers`` do: their factors and every tensor that is not a LoRA factor (a head)."""
    return {key: value for key, value in state.items() if not is_factor(key) or module_of(key) in layers}


def drop_layers(state: Mapping[str, Tensor], kept: Collection[str]) -> dict[str, Tensor]:
    """``state`` with the factors of every LoRA layer not in ``kept`` zeroed: those layers' updates removed."""
    return {
        key: value if not is_factor(key) or module_of(key) in kept else torch.zeros_like(value)
        for key, value in state.items()
    }
