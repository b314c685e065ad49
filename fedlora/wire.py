"""What travels: an adapter state packed into one Flower ``ArrayRecord`` of two arrays.

Keys are the names of the model's trainable parameters (for example
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``; see
:mod:`fedlora.keys`), identical on every party because every party builds the
same model. Values are tensors in the transport dtype; receivers always get
float32 back.

Why packed. Flower 1.41 sends every array of a record as objects of its own
(the array's metadata, its data chunk, and the record's reference to it, each
with a 64-character id), about 790 bytes per array besides the data
(:func:`serialized_nbytes`). An adapter is ~100 small tensors, so one array per
tensor cost SmolLM2's reply 5.2% of its payload in float32 and 10.3% in
float16; packed, 0.11% and 0.22%. Here a record holds exactly two arrays:

* :data:`PAYLOAD`: every tensor flattened and concatenated, in state order, in
  the wire dtype;
* :data:`MANIFEST`: uint8, the zlib-compressed JSON list of ``[name, shape]``
  pairs in the same order (names share long prefixes, so it compresses ~10×).

Decoding is strict, because a record from a client is data: anything but these
two arrays, a manifest that does not decode, lengths that do not add up or a
payload outside the wire dtypes is a ``ValueError`` naming the problem.
"""

from __future__ import annotations

import itertools
import json
import math
import zlib
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.proto.message_pb2 import PushObjectRequest
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from torch import Tensor

WIRE_DTYPES: dict[str, type[np.floating]] = {"float32": np.float32, "float16": np.float16}
PAYLOAD, MANIFEST = "tensors", "manifest"
MAX_MANIFEST_BYTES = 1 << 24
"""Most bytes a manifest may inflate to: far above any adapter's (~100 bytes per tensor), and a bound on a zip bomb."""

Entry = tuple[str, tuple[int, ...]]


def to_record(state: Mapping[str, Tensor], dtype: str = "float32") -> ArrayRecord:
    """Pack adapter tensors for the wire, cast to ``dtype`` (``float32`` or ``float16``)."""
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"unknown wire dtype '{dtype}'; expected one of {', '.join(WIRE_DTYPES)}")
    target = WIRE_DTYPES[dtype]
    # Cast in torch first: NumPy has no bfloat16.
    parts = [v.detach().float().cpu().numpy().astype(target).ravel() for v in state.values()]
    payload = np.concatenate([np.empty(0, target), *parts])  # the empty start: a state may be empty (local-only)
    manifest = zlib.compress(manifest_json(state), 9)
    return ArrayRecord({PAYLOAD: Array(payload), MANIFEST: Array(np.frombuffer(manifest, np.uint8))})


def manifest_json(state: Mapping[str, Tensor]) -> bytes:
    """The manifest of ``state`` before compression: its ``[name, shape]`` pairs as compact JSON."""
    return json.dumps([[k, list(v.shape)] for k, v in state.items()], separators=(",", ":")).encode()


def from_record(record: ArrayRecord) -> dict[str, Tensor]:
    """Unpack a received record into float32 tensors, keyed as sent; ``ValueError`` if it is not a packed adapter."""
    return {k: torch.from_numpy(v.astype(np.float32)) for k, v in unpack(record).items()}


def unpack(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The tensors of a packed record as NumPy arrays in its wire dtype, in manifest order (strictly checked)."""
    if sorted(record) != sorted((PAYLOAD, MANIFEST)):
        raise ValueError(f"an adapter record holds exactly the arrays '{PAYLOAD}' and '{MANIFEST}', got {list(record)}")
    entries = _manifest(record[MANIFEST])
    payload = _load(record[PAYLOAD], PAYLOAD)
    if payload.dtype.name not in WIRE_DTYPES or payload.ndim != 1:
        raise ValueError(
            f"the payload arrived as {payload.dtype} of shape {payload.shape}; expected a flat "
            f"{' or '.join(WIRE_DTYPES)} array"
        )
    sizes = [math.prod(shape) for _, shape in entries]
    if sum(sizes) != payload.size:
        raise ValueError(f"the manifest describes {sum(sizes)} values, the payload holds {payload.size}")
    offsets = list(itertools.accumulate(sizes, initial=0))
    return {
        name: payload[start:end].reshape(shape)
        for (name, shape), start, end in zip(entries, offsets[:-1], offsets[1:], strict=True)
    }


def _load(array: Array, name: str) -> np.ndarray:
    """``array`` as NumPy; whatever its bytes hold, only a ``ValueError`` that names it."""
    try:
        return array.numpy()
    except Exception as err:  # np.load raises many kinds on malformed bytes; a reply is data
        raise ValueError(f"array '{name}' cannot be read ({type(err).__name__}: {err})") from None


def _manifest(array: Array) -> list[Entry]:
    """The ``(name, shape)`` entries of a manifest array, inflated to at most :data:`MAX_MANIFEST_BYTES`."""
    data = _load(array, MANIFEST)
    if data.dtype != np.uint8 or data.ndim != 1:
        raise ValueError(f"the manifest arrived as {data.dtype} of shape {data.shape}; expected flat uint8")
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(data.tobytes(), MAX_MANIFEST_BYTES)
    except zlib.error as err:
        raise ValueError(f"the manifest cannot be decompressed ({err})") from None
    if inflater.unconsumed_tail:
        raise ValueError(f"the manifest inflates to more than {MAX_MANIFEST_BYTES} bytes")
    if not inflater.eof:
        raise ValueError("the manifest is truncated")
    try:
        entries = json.loads(text)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError alike
        raise ValueError(f"the manifest is not JSON ({err})") from None
    if not isinstance(entries, list) or not all(map(_is_entry, entries)):
        raise ValueError("the manifest must be a list of [name, shape] pairs, shapes lists of non-negative integers")
    names = [name for name, _ in entries]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"the manifest names {', '.join(repr(n) for n in twice)} more than once")
    return [(name, tuple(shape)) for name, shape in entries]


def _is_entry(entry: object) -> bool:
    return (
        isinstance(entry, list)
        and len(entry) == 2
        and isinstance(entry[0], str)
        and isinstance(entry[1], list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry[1])
    )


def record_nbytes(record: ArrayRecord) -> int:
    """Bytes of a record's arrays (data with NumPy headers) and their names: Flower's count, as metrics.json reports."""
    return record.count_bytes()


def serialized_nbytes(record: ArrayRecord) -> int:
    """Bytes Flower 1.41 sends for ``record``: every object of it in the protobuf request that carries it.

    Flower does not send an ``ArrayRecord`` as one protobuf: a message lists the
    tree of its objects' ids (``ObjectTree``), then each object (the record, each
    array, each array's data chunks of at most 5 MB) travels deflated, in its own
    ``PushObjectRequest`` with its 64-character id, once however often it occurs.
    Counted here: the record's object tree and those requests, without their node,
    run and session fields (the same few bytes on every request, whatever it carries).
    """
    objects = get_all_nested_objects(record)
    requests = (PushObjectRequest(object_id=i, object_content=o.deflate()).ByteSize() for i, o in objects.items())
    return get_object_tree(record).ByteSize() + sum(requests)
