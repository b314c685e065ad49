"""Strategies on synthetic Flower messages: aggregation, validation of replies, byte counts."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch
from conftest import reply
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedlora.config import from_run_config
from fedlora.keys import ARRAYS
from fedlora.wire import PAYLOAD, from_record, to_record
from strategies import FedAvgFactors, FedAvgProducts, build_strategy

D, K, R = 12, 10, 2


class FakeGrid:
    """Just enough of a Flower Grid for configure_train: a fixed set of connected nodes."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return self.node_ids


def lora_state(seed: int, rank: int = R) -> dict[str, np.ndarray]:
    gen = np.random.default_rng(seed)
    return {
        "m.q.lora_A.weight": gen.standard_normal((rank, K)).astype(np.float32),
        "m.q.lora_B.weight": gen.standard_normal((D, rank)).astype(np.float32),
        "head.weight": gen.standard_normal((3, K)).astype(np.float32),
    }


def configured(strategy_cls: type, seed: int = 0) -> FedAvgFactors:
    strategy = strategy_cls(min_train_nodes=1, min_available_nodes=1)
    global_arrays = to_record({k: torch.from_numpy(v) for k, v in lora_state(seed).items()})
    strategy.configure_train(1, global_arrays, ConfigRecord(), FakeGrid([11, 12, 13]))
    return strategy


@pytest.mark.usefixtures("flower_identity")
def test_fedavg_factors_is_the_weighted_mean_of_each_tensor() -> None:
    strategy = configured(FedAvgFactors)
    states = [lora_state(1), lora_state(2)]
    arrays, metrics = strategy.aggregate_train(1, [reply(11, states[0], 1), reply(12, states[1], 3)])
    out = from_record(arrays)
    for key in states[0]:
        np.testing.assert_allclose(out[key].numpy(), 0.25 * states[0][key] + 0.75 * states[1][key], rtol=1e-6)
    assert metrics["train-loss"] == pytest.approx(1.0)
    assert metrics["bytes-up"] == sum(
        to_record({k: torch.from_numpy(v) for k, v in s.items()}).count_bytes() for s in states
    )
    assert metrics["bytes-down"] == 3 * arrays.count_bytes()  # same global adapter to 3 sampled nodes


@pytest.mark.usefixtures("flower_identity")
def test_fedavg_products_averages_products_and_records_truncation() -> None:
    strategy = configured(FedAvgProducts)
    states = [lora_state(1), lora_state(2), lora_state(3)]
    weights = [1.0, 1.0, 2.0]
    replies = [reply(11 + i, s, w) for i, (s, w) in enumerate(zip(states, weights))]
    arrays, metrics = strategy.aggregate_train(1, replies)
    out = from_record(arrays)
    dense = sum(w / 4 * s["m.q.lora_B.weight"] @ s["m.q.lora_A.weight"] for s, w in zip(states, weights))
    u, sigma, vh = np.linalg.svd(dense)
    best = (u[:, :R] * sigma[:R]) @ vh[:R]
    np.testing.assert_allclose((out["m.q.lora_B.weight"] @ out["m.q.lora_A.weight"]).numpy(), best, atol=1e-4)
    head = sum(w / 4 * s["head.weight"] for s, w in zip(states, weights))
    np.testing.assert_allclose(out["head.weight"].numpy(), head, rtol=1e-5)
    expected = np.sqrt((sigma[R:] ** 2).sum() / (sigma**2).sum())
    assert metrics["truncation-error-max"] == pytest.approx(expected, rel=1e-4)
    assert strategy.round_log[1]["truncation-error-per-layer"] == {"m.q": pytest.approx(expected, rel=1e-4)}


def corrupt(kind: str) -> Message:
    """Node 12's reply with one thing wrong."""
    state = lora_state(5)
    if kind == "wrong shape":
        state["m.q.lora_B.weight"] = np.zeros((D, R + 2), np.float32)
    elif kind == "nan":
        state["head.weight"][0, 0] = np.nan
    elif kind == "inf":
        state["head.weight"][0, 0] = np.inf
    elif kind == "missing key":
        del state["head.weight"]
    elif kind == "extra key":
        state["m.k.lora_A.weight"] = np.zeros((R, K), np.float32)
    message = reply(12, state)
    if kind == "integer dtype":  # a payload outside the wire dtypes (to_record would have cast it to float32)
        record = message.content[ARRAYS]
        record[PAYLOAD] = Array(record[PAYLOAD].numpy().astype(np.int64))
    return message


@pytest.mark.usefixtures("flower_identity")
@pytest.mark.parametrize(
    "kind, reason",
    [
        ("wrong shape", r"tensor 'm.q.lora_B.weight' has shape \(12, 4\), expected \(12, 2\)"),
        ("nan", "tensor 'head.weight' contains NaN or Inf"),
        ("inf", "tensor 'head.weight' contains NaN or Inf"),
        ("missing key", "missing tensor.*'head.weight'"),
        ("extra key", "unexpected tensor.*'m.k.lora_A.weight'"),
        ("integer dtype", r"the payload arrived as int64 of shape \(74,\); expected a flat float32 or float16 array"),
    ],
)
@pytest.mark.parametrize("strategy_cls", [FedAvgFactors, FedAvgProducts])
def test_a_bad_reply_is_excluded_with_its_reason_and_the_round_goes_on(
    strategy_cls: type, kind: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    strategy = configured(strategy_cls)
    good = lora_state(1)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = strategy.aggregate_train(3, [reply(11, good), corrupt(kind)])
    assert any("node 12 excluded" in r.getMessage() and re.search(reason, r.getMessage()) for r in caplog.records), [
        r.getMessage() for r in caplog.records
    ]
    out = from_record(arrays)
    np.testing.assert_allclose(out["head.weight"].numpy(), good["head.weight"], rtol=1e-6)  # only the good one
    assert metrics["excluded-replies"] == 1


@pytest.mark.usefixtures("flower_identity")
@pytest.mark.parametrize("num_examples", [0, -5, float("nan"), float("inf")])
def test_bad_weight_is_excluded(num_examples: object) -> None:
    strategy = configured(FedAvgFactors)
    arrays, _ = strategy.aggregate_train(1, [reply(11, lora_state(1)), reply(12, lora_state(2), num_examples)])
    np.testing.assert_allclose(from_record(arrays)["head.weight"].numpy(), lora_state(1)["head.weight"], rtol=1e-6)


@pytest.mark.usefixtures("flower_identity")
def test_no_good_reply_keeps_the_global_adapter() -> None:
    strategy = configured(FedAvgFactors)
    arrays, metrics = strategy.aggregate_train(1, [reply(11, None), corrupt("nan")])
    assert arrays is None and metrics is None  # Flower keeps the previous global arrays
    assert strategy.round_log[1]["excluded-replies"] == 2


@pytest.mark.usefixtures("flower_identity")
def test_global_adapter_is_rounded_to_the_wire_dtype() -> None:
    strategy = build_strategy(from_run_config({"wire.dtype": "float16", "min-train-nodes": 1}))
    strategy.configure_train(
        1,
        to_record({k: torch.from_numpy(v) for k, v in lora_state(0).items()}, "float16"),
        ConfigRecord(),
        FakeGrid([1]),
    )
    arrays, _ = strategy.aggregate_train(1, [reply(1, {k: v.astype(np.float16) for k, v in lora_state(1).items()})])
    assert isinstance(arrays, ArrayRecord) and arrays[PAYLOAD].dtype == "float16"


@pytest.mark.usefixtures("flower_identity")
def test_a_malformed_evaluation_reply_is_skipped_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    strategy = build_strategy(from_run_config({"min-train-nodes": 1}))

    def evaluation(node_id: int, metrics: dict) -> Message:
        TaskIdentity.node_id = node_id
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), dst_node_id=0, message_type="evaluate")

    replies = [
        evaluation(1, {"num-examples": 10, "eval-loss": 2.0}),
        evaluation(2, {"eval-loss": 9.0}),
        evaluation(3, {"num-examples": 30, "eval-loss": 1.0}),
        reply(4, None),
    ]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics["eval-loss"] == pytest.approx(1.25)
    assert any("evaluation reply from node 2 excluded" in r.getMessage() for r in caplog.records)
