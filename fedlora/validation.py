"""Checks on adapter states before they are aggregated or loaded.

One bad client must never corrupt the global adapter: the server checks every
reply against the global adapter it sent, and clients check what they receive
against their own model before loading it. A failed check raises
:class:`InvalidUpdate` whose message names the tensor and the problem.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor


class InvalidUpdate(ValueError):
    """An adapter state or its metadata is malformed."""


def check_state(state: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> None:
    """``state`` must have exactly ``reference``'s keys and shapes, floating dtypes and finite values."""
    missing = sorted(set(reference) - set(state))
    if missing:
        raise InvalidUpdate(f"missing tensor(s): {_names(missing)}")
    extra = sorted(set(state) - set(reference))
    if extra:
        raise InvalidUpdate(f"unexpected tensor(s): {_names(extra)}")
    for key, tensor in state.items():
        expected = tuple(reference[key].shape)
        if tuple(tensor.shape) != expected:
            raise InvalidUpdate(f"tensor '{key}' has shape {tuple(tensor.shape)}, expected {expected}")
        if not torch.is_floating_point(tensor):
            raise InvalidUpdate(f"tensor '{key}' has dtype {tensor.dtype}, expected a floating dtype")
        if not torch.isfinite(tensor).all():
            raise InvalidUpdate(f"tensor '{key}' contains NaN or Inf")


def check_weight(value: object, key: str = "num-examples") -> float:
    """An aggregation weight reported by a client: a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise InvalidUpdate(f"metric '{key}' must be a finite number > 0, got {value!r}")
    return float(value)


def _names(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
