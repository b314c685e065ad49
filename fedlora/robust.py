"""Bounds on what one client can do to a round, as pure functions on weights, tensors and metrics.

Validation (:mod:`fedlora.validation`) rejects replies that are malformed; what
is left are replies that are well-formed but wrong: a client that claims a
trillion examples, sends an update a thousand times larger than everyone
else's, or a metric that is NaN. :class:`strategies.base.AdapterStrategy`
applies these functions to every strategy:

* :func:`capped_weights`: no weight above ``max_ratio`` times the round's
  (lower) median, so one client's share of an average is at most
  ``max_ratio / (max_ratio + n - 1)`` among ``n`` clients;
* :func:`robust_states`: the option ``strategy.robust``: the coordinate-wise
  median or trimmed mean of the clients' tensors (Yin et al., ICML 2018,
  https://arxiv.org/abs/1803.01498; the trimmed mean is Flower's ``FedTrimmedAvg``
  function), or every update clipped to the round's median update norm;
* :func:`average_metrics`: the weighted average of the finite scalar metrics,
  with a reason for every value left out.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from torch import Tensor

from fedlora.config import ROBUST_MODES
from fedlora.keys import NUM_EXAMPLES


def capped_weights(weights: Sequence[float], max_ratio: float) -> list[float]:
    """``weights`` with each cut to ``max_ratio`` × their lower median; their sum must stay finite.

    The lower median, not the mean of the middle two: with two clients the
    mean would be half of a huge claim and the cap would not bind.
    """
    if not weights:
        return []
    cap = max_ratio * statistics.median_low(weights)
    capped = [min(w, cap) for w in weights]
    if not math.isfinite(math.fsum(capped)):
        raise ValueError(f"aggregation weights sum to {math.fsum(capped)}: {list(weights)}")
    return capped


def update_norm(state: Mapping[str, Tensor], sent: Mapping[str, Tensor]) -> float:
    """L2 norm of ``state − sent`` over all of ``sent``'s tensors, in float64 (no overflow for finite float32)."""
    return math.sqrt(math.fsum(float((state[k].double() - v.double()).square().sum()) for k, v in sent.items()))


def robust_states(
    states: Sequence[Mapping[str, Tensor]],
    sents: Sequence[Mapping[str, Tensor]],
    mode: str,
    trim_fraction: float = 0.2,
) -> list[dict[str, Tensor]]:
    """The clients' states with the influence of a minority of bad ones bounded, for any strategy to aggregate.

    ``sents[k]`` is what client ``k`` was sent; only those tensors are touched
    (a strategy's extra entries, such as AdaLoRA's masks, pass through).

    * ``median`` / ``trimmed-mean``: every client's tensor is replaced by the
      coordinate-wise median / ``trim_fraction``-trimmed mean over the clients
      that were sent a tensor of the same key and shape (clients of one rank
      tier, one task), so the strategy's average of them is that robust centre
      (weights no longer matter); a coordinate's median lies within the range of
      the honest clients' values as long as they are a majority.
    * ``clip-to-median``: every update ``state − sent`` longer than the round's
      median update norm is scaled down to it, keeping its direction (the
      strategy's weighting still applies).
    """
    if mode not in ROBUST_MODES:
        raise ValueError(f"unknown robust aggregation '{mode}'; expected one of {', '.join(ROBUST_MODES)}")
    out = [dict(s) for s in states]
    if mode == "clip-to-median":
        norms = [update_norm(s, sent) for s, sent in zip(states, sents, strict=True)]
        bound = statistics.median(norms)
        for state, sent, norm in zip(out, sents, norms, strict=True):
            if norm > bound:
                state.update({k: v + (state[k] - v) * (bound / norm) for k, v in sent.items()})
    elif mode in ("median", "trimmed-mean"):
        groups: dict[tuple[str, tuple[int, ...]], list[int]] = {}
        for index, sent in enumerate(sents):
            for key, tensor in sent.items():
                groups.setdefault((key, tuple(tensor.shape)), []).append(index)
        for (key, _), members in groups.items():
            stacked = np.stack([states[i][key].double().numpy() for i in members])
            centre = np.median(stacked, axis=0) if mode == "median" else trim_mean(stacked, trim_fraction)
            for i in members:
                out[i][key] = torch.from_numpy(np.asarray(centre)).to(states[i][key].dtype)
    return out


def average_metrics(
    records: Sequence[Mapping[str, Any]], weights: Sequence[float], skip: str = NUM_EXAMPLES
) -> tuple[dict[str, float], list[tuple[int, str]]]:
    """Per key, the weighted average of the finite scalar values (key ``skip`` is the weight itself, left out).

    A value that is not a finite int or float (a list, text, a boolean, NaN)
    is dropped: returned as ``(index of its record, reason)``, and the key is
    averaged over the records whose value is good. Flower's
    ``aggregate_metricrecords`` raises on a key sent as a list by one client
    and a number by another; here that is one dropped value.
    """
    sums: dict[str, float] = {}
    mass: dict[str, float] = {}
    dropped = []
    for index, (record, weight) in enumerate(zip(records, weights, strict=True)):
        for key, value in record.items():
            if key == skip:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                dropped.append((index, f"metric '{key}' dropped: {value!r} is not a finite number"))
                continue
            sums[key] = sums.get(key, 0.0) + weight * value
            mass[key] = mass.get(key, 0.0) + weight
    return {key: sums[key] / mass[key] for key in sums}, dropped
