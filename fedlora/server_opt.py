"""Server optimisers over adapters: a step from the global adapter along the round's aggregated update.

Treating "aggregate minus current global" as a pseudo-gradient and giving the
server its own optimiser is FedOpt (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021, https://arxiv.org/abs/2003.00295: FedAdagrad, FedAdam,
FedYogi) and, with SGD plus momentum, FedAvgM (Hsu et al., "Measuring the Effects
of Non-Identical Data Distribution for Federated Visual Classification", 2019,
https://arxiv.org/abs/1909.06335). The update rules are those of Flower's
``FedAvgM``, ``FedAdagrad``, ``FedAdam`` and ``FedYogi``
(``flwr.serverapp.strategy``); they are written again here on torch tensors
because Flower's classes *are* strategies (FedAvg subclasses that aggregate
whole ``ArrayRecord``s), and fedlora's strategies aggregate adapters their own
way and need the step on a subset of the tensors (a strategy's shared ones).
One difference: Adam's bias correction counts the server's steps (1, 2, ...),
as in Kingma & Ba, where Flower's ``FedAdam`` uses ``server_round + 1``.

Everything is a pure function of (current, aggregated, moments), so a failed
round can drop the new moments with the new adapter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedlora.config import SERVER_OPTIMIZERS


@dataclass(frozen=True)
class ServerOptimizer:
    """Which update rule and its hyper-parameters (the ``strategy.server-*`` run-config keys)."""

    kind: str  # "avgm", "adagrad", "adam" or "yogi"
    lr: float = 1.0
    momentum: float = 0.0  # avgm
    beta1: float = 0.9  # adaptive: running mean of the update
    beta2: float = 0.99  # adam, yogi: running second moment
    tau: float = 1e-3  # adaptive: floor of the denominator

    def __post_init__(self) -> None:
        if self.kind not in SERVER_OPTIMIZERS[1:]:
            raise ValueError(f"unknown server optimiser '{self.kind}'; expected one of {SERVER_OPTIMIZERS[1:]}")


@dataclass(frozen=True)
class Moments:
    """The server optimiser's state between rounds: steps taken, first moment (or momentum), second moment."""

    steps: int = 0
    first: dict[str, Tensor] = field(default_factory=dict)
    second: dict[str, Tensor] = field(default_factory=dict)


def server_step(
    opt: ServerOptimizer,
    moments: Moments,
    current: Mapping[str, Tensor],
    aggregated: Mapping[str, Tensor],
    keys: Sequence[str],
) -> tuple[dict[str, Tensor], Moments]:
    """The new global state and moments: ``aggregated``, with each tensor of ``keys`` replaced by the server's step.

    The update of a tensor is ``Δ = aggregated − current``. ``avgm`` (Flower's
    FedAvgM): ``g = −Δ``, ``v = momentum·v + g`` (``v = g`` in the first
    round), ``w = current − lr·v``; with ``lr = 1`` and no momentum that is
    ``aggregated`` itself. ``adagrad`` / ``adam`` / ``yogi``: ``m = β1·m +
    (1−β1)·Δ`` and ``w = current + lr·m / (√v + τ)``, with ``v`` the sum of
    ``Δ²`` (Adagrad), its running mean (Adam, whose ``lr`` is bias-corrected)
    or Yogi's sign-controlled running mean. Tensors outside ``keys`` are taken
    from ``aggregated`` unchanged.
    """
    missing = [k for k in keys if k not in current or k not in aggregated]
    if missing:
        raise ValueError(f"server optimiser: tensors {missing[:3]} are not in both the current and aggregated state")
    new = dict(aggregated)
    first, second = dict(moments.first), dict(moments.second)
    steps = moments.steps + 1
    lr = opt.lr
    if opt.kind == "adam":
        lr *= math.sqrt(1 - opt.beta2**steps) / (1 - opt.beta1**steps)
    for key in keys:
        old = current[key].float()
        delta = aggregated[key].float() - old
        if delta.shape != old.shape:
            raise ValueError(f"server optimiser: '{key}' changed shape from {tuple(old.shape)} to {tuple(delta.shape)}")
        if opt.kind == "avgm":
            gradient = -delta
            if opt.momentum > 0:
                gradient = gradient if key not in first else opt.momentum * first[key] + gradient
                first[key] = gradient
            new[key] = old - opt.lr * gradient
            continue
        m = opt.beta1 * first.get(key, torch.zeros_like(old)) + (1 - opt.beta1) * delta
        v = second.get(key, torch.zeros_like(old))
        square = delta.square()
        if opt.kind == "adagrad":
            v = v + square
        elif opt.kind == "adam":
            v = opt.beta2 * v + (1 - opt.beta2) * square
        else:  # yogi
            v = v - (1 - opt.beta2) * square * torch.sign(v - square)
        first[key], second[key] = m, v
        new[key] = old + lr * m / (v.sqrt() + opt.tau)
    return new, Moments(steps, first, second)
