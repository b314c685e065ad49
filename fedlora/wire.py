"""What travels: adapter tensors as a Flower ``ArrayRecord``.

Keys are the names of the model's trainable parameters (for example
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``; see
:mod:`fedlora.adapter`), identical on every party because every party builds the
same model. Values are tensors in the transport dtype; receivers always get
float32 back.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import Tensor

WIRE_DTYPES: dict[str, type[np.floating]] = {"float32": np.float32, "float16": np.float16}


def to_record(state: Mapping[str, Tensor], dtype: str = "float32") -> ArrayRecord:
    """Pack adapter tensors for the wire, cast to ``dtype`` (``float32`` or ``float16``)."""
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"unknown wire dtype '{dtype}'; expected one of {', '.join(WIRE_DTYPES)}")
    target = WIRE_DTYPES[dtype]
    # Cast in torch first: NumPy has no bfloat16.
    return ArrayRecord({k: Array(v.detach().float().cpu().numpy().astype(target)) for k, v in state.items()})


def from_record(record: ArrayRecord) -> dict[str, Tensor]:
    """Unpack a received record into float32 tensors, keyed as sent; only wire dtypes are accepted."""
    state = {}
    for key, array in record.items():
        if array.dtype not in WIRE_DTYPES:
            raise ValueError(f"tensor '{key}' arrived as {array.dtype}; expected {' or '.join(WIRE_DTYPES)}")
        state[key] = torch.from_numpy(np.asarray(array.numpy(), dtype=np.float32))
    return state


def record_nbytes(record: ArrayRecord) -> int:
    """Bytes a record puts on the wire: tensor data plus NumPy headers and keys (Flower's count)."""
    return record.count_bytes()
