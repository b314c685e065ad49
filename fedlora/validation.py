"""Checks on adapter states before they are aggregated or loaded.

One bad client must never corrupt the global adapter: the server checks every
reply against the global adapter it sent, and clients check what they receive
against their own model before loading it. A failed check raises
:class:`InvalidUpdate` whose message names the tensor and the problem.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from flwr.app import ArrayRecord
from torch import Tensor

from fedlora.keys import NUM_EXAMPLES, is_lora_a, is_lora_b, is_lora_e
from fedlora.wire import manifest_json

NPY_HEADER_BYTES = 1024  # a NumPy array's header on the wire: 128 bytes for adapter shapes, with room to spare


class InvalidUpdate(ValueError):
    """An adapter state or its metadata is malformed."""


def check_state(state: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> None:
    """``state`` must have exactly ``reference``'s keys and shapes, floating dtypes and finite values."""
    _check_keys(state, reference)
    for key, tensor in state.items():
        expected = tuple(reference[key].shape)
        if tuple(tensor.shape) != expected:
            hint = _rank_hint(key, tuple(tensor.shape), expected)
            raise InvalidUpdate(f"tensor '{key}' has shape {tuple(tensor.shape)}, expected {expected}{hint}")
        if not torch.is_floating_point(tensor):
            raise InvalidUpdate(f"tensor '{key}' has dtype {tensor.dtype}, expected a floating dtype")
        if not torch.isfinite(tensor).all():
            raise InvalidUpdate(f"tensor '{key}' contains NaN or Inf")


MAX_EXAMPLES = 2**53
"""Largest ``num-examples`` accepted: every integer up to it is exact in a float, and a sum of many stays finite."""


def check_weight(value: object, key: str = NUM_EXAMPLES) -> float:
    """An aggregation weight reported by a client: an integer in 1..:data:`MAX_EXAMPLES` (an integral float counts).

    Why an integer with a bound: a weight is a count of examples, and two
    clients claiming ~1e308 would make the weights sum to infinity, every
    normalised weight 0 and the global adapter all zeros.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 1 <= value <= MAX_EXAMPLES
        or not float(value).is_integer()
    ):
        raise InvalidUpdate(f"metric '{key}' must be an integer in 1..2**53, got {value!r}")
    return float(value)


def check_record_size(record: ArrayRecord, reference: Mapping[str, Tensor]) -> None:
    """Before anything is decoded: ``record`` takes no more bytes than ``reference`` packed in float32 can.

    A reply is refused by its byte count, so a client cannot make the server
    materialise more than the adapter it was sent. The bound counts every array
    of the record (a packed record has two, :mod:`fedlora.wire`): ``reference``'s
    values in float32, its manifest uncompressed (compressed, the manifest of the
    same names is smaller) and two NumPy headers. What the arrays hold is checked
    when they are decoded.
    """
    size = sum(len(array.data) for array in record.values())
    limit = 4 * sum(t.numel() for t in reference.values()) + len(manifest_json(reference)) + 2 * NPY_HEADER_BYTES
    if size > limit:
        raise InvalidUpdate(f"the reply's arrays are {size} bytes, more than the {limit} the adapter sent can take")


def rank_masks(state: Mapping[str, Tensor], pattern: Mapping[str, object]) -> dict[str, Tensor]:
    """Per AdaLoRA ``lora_E`` tensor of ``state``, the boolean mask of the rank indices its client kept.

    ``pattern`` maps ``lora_E`` keys to lists of booleans (an empty pattern: the
    client has pruned nothing yet). A pattern must cover every ``lora_E`` tensor
    with one flag per index, and a pruned index must have a zero singular value:
    otherwise the reply's pattern and tensors disagree and it is rejected.
    """
    e_keys = [k for k in state if is_lora_e(k)]
    if not pattern:
        return {k: torch.ones(state[k].numel(), dtype=torch.bool) for k in e_keys}
    if sorted(pattern) != sorted(e_keys):
        raise InvalidUpdate(
            f"rank pattern covers {_names(sorted(pattern))}, expected the lora_E tensors {_names(e_keys)}"
        )
    masks = {}
    for key in e_keys:
        flags = pattern[key]
        if (
            not isinstance(flags, list)
            or len(flags) != state[key].numel()
            or not all(isinstance(f, bool) for f in flags)
        ):
            raise InvalidUpdate(f"rank pattern of '{key}' must be {state[key].numel()} booleans, got {flags!r}")
        mask = torch.tensor(flags)
        if (state[key].flatten()[~mask] != 0).any():
            raise InvalidUpdate(f"rank pattern of '{key}' marks indices pruned whose singular value is not zero")
        masks[key] = mask
    return masks


def _check_keys(found: Iterable[str], reference: Iterable[str]) -> None:
    missing = sorted(set(reference) - set(found))
    if missing:
        raise InvalidUpdate(f"missing tensor(s): {_names(missing)}")
    extra = sorted(set(found) - set(reference))
    if extra:
        raise InvalidUpdate(f"unexpected tensor(s): {_names(extra)}")


def _rank_hint(key: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> str:
    """For a LoRA factor whose other dimension is right: the rank it has and the rank it was sent."""
    axis = 0 if is_lora_a(key) else 1 if is_lora_b(key) else None
    if axis is None or len(shape) != 2 or len(expected) != 2 or shape[1 - axis] != expected[1 - axis]:
        return ""
    return f" (rank {shape[axis]}, but it was sent rank {expected[axis]})"


def _names(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
