"""LISA's round plan, as pure functions: which layers train in a round, and what a message of full layers holds.

Pan et al., "LISA: Layerwise Importance Sampling for Memory-Efficient Large
Language Model Fine-Tuning", NeurIPS 2024, https://arxiv.org/abs/2403.17919.
Every period, γ decoder layers are drawn uniformly without replacement; they
train with the embeddings, final norm and head, the other layers stay frozen.
Federated, a period is ``lisa.period`` rounds, and the draw depends only on
the run's seed and the period's number, so every party, and a resumed server,
computes the same layers with no state of its own.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from torch import Tensor

from fedlora.keys import frozen_key, layer_of


def sample_layers(seed: int, server_round: int, num_layers: int, gamma: int, period: int = 1) -> list[int]:
    """The γ layers (sorted) that train in ``server_round`` (from 1): one uniform draw per ``period`` rounds."""
    if not 1 <= gamma <= num_layers:
        raise ValueError(f"cannot sample {gamma} of {num_layers} layers")
    draw = random.Random(f"lisa-{seed}-{(server_round - 1) // period}")  # str seeds hash the same in every process
    return sorted(draw.sample(range(num_layers), gamma))


def layers_trained_before(seed: int, server_round: int, num_layers: int, gamma: int, period: int = 1) -> set[int]:
    """Every layer sampled in rounds 1..``server_round`` - 1: those that may differ from the initial base."""
    return {layer for r in range(1, server_round) for layer in sample_layers(seed, r, num_layers, gamma, period)}


def num_layers(state: Mapping[str, Tensor]) -> int:
    """How many decoder layers the parameters of ``state`` belong to (0 without any)."""
    return 1 + max((i for i in map(layer_of, state) if i is not None), default=-1)


def round_message(state: Mapping[str, Tensor], layers: set[int], trained_before: set[int]) -> dict[str, Tensor]:
    """What a client is sent of ``state``, the server's whole model: the round's layers to train, and more.

    Everything outside the layers trains too (embeddings, final norm, head);
    the layers trained before and not now travel as frozen tensors; the
    layers never trained not at all (every party has them).
    """
    message = {}
    for name, tensor in state.items():
        layer = layer_of(name)
        if layer is None or layer in layers:
            message[name] = tensor
        elif layer in trained_before:
            message[frozen_key(name)] = tensor
    return message
