"""Rank-heterogeneous strategies and AdaLoRA merging on synthetic replies of ranks 2, 4 and 8."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import reply
from e2e import TINY_RUN, check_run, simulate
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedlora import runtime
from fedlora.adapter import adapter_state, load_adapter_state, resize_state
from fedlora.aggregation import (
    budget_masks,
    compact,
    masked_average,
    normalized_weights,
    product_average,
    product_norm,
    resize_rank,
    stack_factors,
)
from fedlora.config import ConfigError, from_run_config
from fedlora.keys import RESIDUAL_A, RESIDUAL_B
from fedlora.training import train_steps, trainable_parameters
from fedlora.validation import InvalidUpdate
from fedlora.wire import from_record, to_record
from strategies import FedAvgFactors, FlexLoRA, FLoRA, HetLoRA, build_strategy
from strategies.adalora_merge import AdaLoRAMerge
from strategies.base import NodeProfile
from strategies.example_median import FactorMedian

D, K, GLOBAL = 12, 10, 16
A_KEY, B_KEY = "m.q.lora_A.weight", "m.q.lora_B.weight"
RANKS = {11: 2, 12: 4, 13: 8}  # node id -> LoRA rank


class RankGrid:
    """A Flower Grid whose nodes answer the profile query with ``ranks`` (and ``tasks``)."""

    def __init__(self, ranks: dict[int, object], tasks: dict[int, str] | None = None) -> None:
        self.ranks = ranks
        self.tasks = tasks or {}
        self.queries = 0

    def get_node_ids(self) -> list[int]:
        return list(self.ranks)

    def send_and_receive(self, messages: list[Message]) -> list[Message]:
        replies = []
        for message in messages:
            assert message.metadata.message_type == "query"
            self.queries += 1
            node = message.metadata.dst_node_id
            TaskIdentity.node_id = node
            profile = {"lora-rank": self.ranks[node], "task": self.tasks.get(node, "")}
            answer = RecordDict({"profile": ConfigRecord(profile)})
            replies.append(Message(content=answer, reply_to=message))
        return replies


def factors(seed: int, rank: int) -> dict[str, np.ndarray]:
    gen = np.random.default_rng(seed)
    return {
        A_KEY: gen.standard_normal((rank, K)).astype(np.float32),
        B_KEY: gen.standard_normal((D, rank)).astype(np.float32),
        "head.weight": gen.standard_normal((3, K)).astype(np.float32),
    }


def start(strategy, ranks: dict[int, object] = RANKS, seed: int = 0):
    """Configure round 1 on a grid of nodes with ``ranks``; return the messages sent, by node."""
    strategy.min_train_nodes = strategy.min_available_nodes = 1
    global_state = {k: torch.from_numpy(v) for k, v in factors(seed, GLOBAL).items()}
    messages = strategy.configure_train(1, to_record(global_state), ConfigRecord(), RankGrid(ranks))
    return {m.metadata.dst_node_id: from_record(m.content["arrays"]) for m in messages}


def dense(states: list[dict], weights: list[float], scaling: float = 1.0) -> np.ndarray:
    p = normalized_weights(weights)
    return sum(pk * scaling * s[B_KEY].astype(np.float64) @ s[A_KEY] for pk, s in zip(p, states))


def test_resize_rank_pads_without_changing_the_product_and_cuts_to_the_best_approximation() -> None:
    gen = torch.Generator().manual_seed(0)
    b, a = torch.randn(D, 3, generator=gen), torch.randn(3, K, generator=gen)
    pb, pa = resize_rank(b, a, 8)
    assert pb.shape == (D, 8) and pa.shape == (8, K)
    torch.testing.assert_close(pb @ pa, b @ a)
    svd = product_average([torch.randn(D, 6, generator=gen)], [torch.randn(6, K, generator=gen)], [1.0], 6)
    cb, ca = resize_rank(svd.b, svd.a, 2)
    u, s, vh = torch.linalg.svd(svd.b @ svd.a)
    torch.testing.assert_close(cb @ ca, (u[:, :2] * s[:2]) @ vh[:2], atol=1e-4, rtol=1e-4)


def test_product_norm_stacking_and_compaction_match_dense_products() -> None:
    gen = torch.Generator().manual_seed(1)
    bs = [torch.randn(D, r, generator=gen) for r in (2, 4, 8)]
    as_ = [torch.randn(r, K, generator=gen) for r in (2, 4, 8)]
    assert product_norm(bs[1], as_[1]) == pytest.approx(float((bs[1] @ as_[1]).norm()), rel=1e-5)
    b, a = stack_factors(bs, as_, [0.5, 0.3, 0.2])
    torch.testing.assert_close(b @ a, sum(c * bk @ ak for c, bk, ak in zip([0.5, 0.3, 0.2], bs, as_)))
    twice_b, twice_a = torch.cat([bs[0], bs[0]], 1), torch.cat([as_[0], as_[0]], 0)  # rank 2 in 4 columns
    cb, ca = compact(twice_b, twice_a)
    assert ca.shape[0] == 2
    torch.testing.assert_close(cb @ ca, twice_b @ twice_a, atol=1e-4, rtol=1e-5)


def test_masked_average_ignores_pruned_indices_and_budget_keeps_the_largest() -> None:
    e1, e2 = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 0.0, 5.0])
    masks = [torch.tensor([True, True, False]), torch.tensor([True, False, False])]
    out = masked_average([e1, e2], masks, [1.0, 3.0], fallback=torch.full((3,), -1.0))
    torch.testing.assert_close(out, torch.tensor([2.5, 2.0, -1.0]))  # index 1 from client 1 alone, not (2+0)/2
    kept = budget_masks({"x": torch.tensor([0.1, -3.0, 0.5]), "y": torch.tensor([2.0, 0.0])}, 2)
    assert kept["x"].tolist() == [False, True, False] and kept["y"].tolist() == [True, False]


@pytest.mark.usefixtures("flower_identity")
def test_each_node_is_asked_its_rank_once_and_sent_an_adapter_of_that_rank() -> None:
    strategy = FlexLoRA()
    grid = RankGrid(RANKS)
    strategy.min_train_nodes = strategy.min_available_nodes = 1
    state = {k: torch.from_numpy(v) for k, v in factors(0, GLOBAL).items()}
    for server_round in (1, 2):
        sent = strategy.configure_train(server_round, to_record(state), ConfigRecord(), grid)
        shapes = {m.metadata.dst_node_id: from_record(m.content["arrays"])[A_KEY].shape[0] for m in sent}
        assert shapes == RANKS
    assert grid.queries == 3


@pytest.mark.usefixtures("flower_identity")
@pytest.mark.parametrize("answer", [32, 0, 8.5, "eight"])
def test_a_node_with_an_invalid_rank_is_left_out(answer: object, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="flwr"):
        sent = start(HetLoRA(), {11: 4, 12: answer})
    assert list(sent) == [11]
    assert any("node 12 left out" in r.getMessage() and "lora-rank" in r.getMessage() for r in caplog.records)


@pytest.mark.usefixtures("flower_identity")
def test_flexlora_is_the_exact_product_average_and_sends_each_client_its_best_rank_cut() -> None:
    strategy = FlexLoRA()
    start(strategy)
    states = {node: factors(node, rank) for node, rank in RANKS.items()}
    weights = {11: 1.0, 12: 2.0, 13: 3.0}
    arrays, _ = strategy.aggregate_train(1, [reply(n, s, weights[n]) for n, s in states.items()])
    out = from_record(arrays)
    exact = dense(list(states.values()), list(weights.values()))  # Σ ranks = 14 ≤ 16: nothing cut
    np.testing.assert_allclose((out[B_KEY] @ out[A_KEY]).double().numpy(), exact, atol=1e-5, rtol=1e-5)
    strategy.configure_evaluate(1, arrays, ConfigRecord(), RankGrid(RANKS))
    cut = strategy.client_state(NodeProfile(4))
    u, s, vh = np.linalg.svd(exact)
    np.testing.assert_allclose((cut[B_KEY] @ cut[A_KEY]).numpy(), (u[:, :4] * s[:4]) @ vh[:4], atol=1e-4)


@pytest.mark.usefixtures("flower_identity")
def test_flora_stacks_exactly_into_the_residual_and_restarts_the_factors() -> None:
    scaling = 2.0
    strategy = FLoRA(scaling=scaling)
    sent = start(strategy)
    for node, rank in RANKS.items():
        assert sent[node][A_KEY].shape == (rank, K) and not sent[node][B_KEY].any()
    states = {node: factors(node, rank) for node, rank in RANKS.items()}
    arrays, metrics = strategy.aggregate_train(1, [reply(n, s, n - 10) for n, s in states.items()])
    out = from_record(arrays)
    exact = dense(list(states.values()), [1, 2, 3], scaling)
    residual = (out["m.q" + RESIDUAL_B] @ out["m.q" + RESIDUAL_A]).double().numpy()
    np.testing.assert_allclose(residual, exact, atol=1e-5, rtol=1e-5)
    assert not out[B_KEY].any() and metrics["residual-rank-max"] == 10  # min(14, k=10)
    # Round 2 adds to the residual; the messages carry it, with fresh factors again.
    sent = strategy.configure_train(2, arrays, ConfigRecord(), RankGrid(RANKS))
    message = from_record(next(iter(sent)).content["arrays"])
    assert "m.q" + RESIDUAL_A in message and not message[B_KEY].any()
    second = {node: factors(node + 100, rank) for node, rank in RANKS.items()}
    arrays, _ = strategy.aggregate_train(2, [reply(n, s) for n, s in second.items()])
    out = from_record(arrays)
    total = exact + dense(list(second.values()), [1, 1, 1], scaling)
    np.testing.assert_allclose((out["m.q" + RESIDUAL_B] @ out["m.q" + RESIDUAL_A]).numpy(), total, atol=1e-4)


@pytest.mark.usefixtures("flower_identity")
@pytest.mark.parametrize("norm_weighting", [False, True])
def test_hetlora_zero_pads_and_equals_fedavg_where_ranks_agree(norm_weighting: bool) -> None:
    equal = {11: GLOBAL, 12: GLOBAL}
    het, plain = HetLoRA(norm_weighting=False), FedAvgFactors()
    start(het, equal), start(plain, equal)
    replies = [reply(11, factors(1, GLOBAL), 1), reply(12, factors(2, GLOBAL), 3)]
    ours, theirs = from_record(het.aggregate_train(1, replies)[0]), from_record(plain.aggregate_train(1, replies)[0])
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key])
    # Mixed ranks: rank indices beyond a client's rank average in its zeros (the paper's zero-padding).
    strategy = HetLoRA(norm_weighting=norm_weighting)
    start(strategy)
    states = {node: factors(node, rank) for node, rank in RANKS.items()}
    out = from_record(strategy.aggregate_train(1, [reply(n, s) for n, s in states.items()])[0])
    weights = [product_norm(torch.from_numpy(s[B_KEY]), torch.from_numpy(s[A_KEY])) for s in states.values()]
    p = normalized_weights(weights if norm_weighting else [1, 1, 1])
    expected = sum(
        pk * resize_rank(torch.from_numpy(s[A_KEY]).T, torch.zeros(s[A_KEY].shape[0], 1), GLOBAL)[0].T
        for pk, s in zip(p, states.values())
    )
    torch.testing.assert_close(out[A_KEY], expected, atol=1e-6, rtol=1e-5)
    assert out[A_KEY][8:].abs().sum() == 0  # nobody trained indices 8..15


@pytest.mark.usefixtures("flower_identity")
def test_a_reply_of_another_rank_than_it_was_sent_is_rejected(caplog: pytest.LogCaptureFixture) -> None:
    strategy = FlexLoRA()
    start(strategy)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        _, metrics = strategy.aggregate_train(1, [reply(11, factors(1, 2)), reply(12, factors(2, 8))])
    assert metrics["excluded-replies"] == 1
    assert any(
        "node 12 excluded" in r.getMessage() and "rank 8, but it was sent rank 4" in r.getMessage()
        for r in caplog.records
    )


def adalora_state(seed: int, rank: int = 4, pruned: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
    gen = np.random.default_rng(seed)
    e = gen.uniform(0.5, 1.0, (rank, 1)).astype(np.float32)
    e[list(pruned)] = 0.0
    return {
        "m.q.lora_A.default": gen.standard_normal((rank, K)).astype(np.float32),
        "m.q.lora_B.default": gen.standard_normal((D, rank)).astype(np.float32),
        "m.q.lora_E.default": e,
    }


def adalora_reply(node: int, state: dict, pattern: dict | None) -> Message:
    message = reply(node, state)
    if pattern is not None:
        message.content["rank-pattern"] = ConfigRecord(pattern)
    return message


@pytest.mark.usefixtures("flower_identity")
def test_adalora_merge_averages_each_triplet_over_the_clients_that_kept_it() -> None:
    strategy = AdaLoRAMerge(min_train_nodes=1, min_available_nodes=1)
    state = {k: torch.from_numpy(v) for k, v in adalora_state(0).items()}
    strategy.configure_train(1, to_record(state), ConfigRecord(), RankGrid({11: 4, 12: 4, 13: 4}))
    a, b, c = adalora_state(1, pruned=(3,)), adalora_state(2, pruned=(1, 3)), adalora_state(3, pruned=(3,))
    e, a_key, b_key = "m.q.lora_E.default", "m.q.lora_A.default", "m.q.lora_B.default"
    replies = [
        adalora_reply(11, a, {e: [True, True, True, False]}),
        adalora_reply(12, b, {e: [True, False, True, False]}),
        adalora_reply(13, c, {e: [True, True, True, False]}),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    out = from_record(arrays)
    # Client 12 pruned index 1: it is averaged over clients 11 and 13 only, not pulled towards zero.
    assert out[e][1, 0] == pytest.approx((a[e][1, 0] + c[e][1, 0]) / 2)
    np.testing.assert_allclose(out[a_key][1].numpy(), (a[a_key][1] + c[a_key][1]) / 2, rtol=1e-5)
    assert out[e][0, 0] == pytest.approx((a[e][0, 0] + b[e][0, 0] + c[e][0, 0]) / 3)
    np.testing.assert_allclose(
        out[b_key][:, 0].numpy(), (a[b_key][:, 0] + b[b_key][:, 0] + c[b_key][:, 0]) / 3, rtol=1e-5
    )
    assert out[e][3, 0] == 0  # pruned by everyone: stays pruned
    assert metrics["rank-budget"] == 3  # round(mean(3, 2, 3)) live triplets in all layers


@pytest.mark.usefixtures("flower_identity")
@pytest.mark.parametrize(
    "pattern, reason",
    [
        ({"m.q.lora_E.default": [True, True, False, True]}, "marks indices pruned whose singular value is not zero"),
        ({"m.q.lora_E.default": [True, True]}, "must be 4 booleans"),
        ({"m.k.lora_E.default": [True] * 4}, "rank pattern covers"),
    ],
)
def test_a_rank_pattern_inconsistent_with_its_tensors_is_rejected(
    pattern: dict, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    strategy = AdaLoRAMerge(min_train_nodes=1, min_available_nodes=1)
    strategy.configure_train(
        1,
        to_record({k: torch.from_numpy(v) for k, v in adalora_state(0).items()}),
        ConfigRecord(),
        RankGrid({11: 4, 12: 4}),
    )
    with caplog.at_level(logging.WARNING, logger="flwr"):
        _, metrics = strategy.aggregate_train(
            1, [adalora_reply(11, adalora_state(1), None), adalora_reply(12, adalora_state(2), pattern)]
        )
    assert metrics["excluded-replies"] == 1
    assert any("node 12 excluded" in r.getMessage() and reason in r.getMessage() for r in caplog.records)


def test_strategies_are_chosen_by_name_or_import_path() -> None:
    assert isinstance(build_strategy(from_run_config({"strategy.name": "flora"})), FLoRA)
    custom = build_strategy(from_run_config({"strategy.name": "strategies.example_median:FactorMedian"}))
    assert isinstance(custom, FactorMedian)
    het = build_strategy(from_run_config({"strategy.name": "hetlora", "strategy.norm-weighting": False}))
    assert isinstance(het, HetLoRA) and not het.norm_weighting
    with pytest.raises(ConfigError, match="cannot import"):
        build_strategy(from_run_config({"strategy.name": "no.such.module:Thing"}))
    with pytest.raises(ConfigError, match="not a subclass"):
        build_strategy(from_run_config({"strategy.name": "fedlora.config:RunConfig"}))


def test_a_residual_merges_into_the_base_weights_and_out_again(tiny_llama) -> None:
    cfg = from_run_config({"model.name": str(tiny_llama), "adapter.target-modules": "q_proj,v_proj"})
    model = runtime.workbench(cfg).model
    state = adapter_state(model)
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    weight = dict(model.named_modules())[module].base_layer.weight
    before = weight.detach().clone()
    gen = torch.Generator().manual_seed(0)
    b, a = torch.randn(weight.shape[0], 3, generator=gen), torch.randn(3, weight.shape[1], generator=gen)
    load_adapter_state(model, {**state, module + RESIDUAL_B: b, module + RESIDUAL_A: a})
    torch.testing.assert_close(weight.detach(), before + b @ a)
    load_adapter_state(model, {**state, module + RESIDUAL_B: 2 * b, module + RESIDUAL_A: a})  # only the change
    torch.testing.assert_close(weight.detach(), before + 2 * b @ a, atol=1e-5, rtol=1e-5)
    load_adapter_state(model, state)  # a message without a residual: the plain base again
    torch.testing.assert_close(weight.detach(), before, atol=1e-5, rtol=0)
    with pytest.raises(InvalidUpdate, match="has no matching"):
        load_adapter_state(model, {**state, module + RESIDUAL_B: b})


def test_a_lower_rank_state_trains_only_its_own_components(tiny_llama) -> None:
    cfg = from_run_config({"model.name": str(tiny_llama), "adapter.r": 8, "adapter.target-modules": "q_proj"})
    bench = runtime.workbench(cfg)
    low = resize_state(adapter_state(bench.model), 2)
    load_adapter_state(bench.model, low)
    train_set, _ = runtime.client_sets(cfg, 0, 2)
    optimizer = torch.optim.AdamW(trainable_parameters(bench.model), lr=0.01)
    train_steps(bench.model, bench.loader(train_set, 4, seed=0), 3, optimizer, 1.0)
    trained = adapter_state(bench.model)
    for key, tensor in trained.items():
        if ".lora_A." in key:
            assert not tensor[2:].any() and tensor[:2].ne(low[key]).any()
        elif ".lora_B." in key:
            assert not tensor[:, 2:].any() and tensor[:, :2].any()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["flexlora", "flora"])  # hetlora: unit tests and the rank comparison
def test_clients_of_ranks_4_8_16_learn_together(tmp_path: Path, tiny_llama: Path, strategy: str) -> None:
    """The apps in process (simulations/inprocess.py): what is tested here is the strategies, not `flwr run`."""
    overrides, rounds = simulate(
        tmp_path,
        {
            **TINY_RUN,
            "model.name": str(tiny_llama),
            "strategy.name": strategy,
            "adapter.r": 16,
            "adapter.rank-tiers": "4,8,16",
        },
        in_process=True,
    )
    check_run(overrides, rounds, "eval-perplexity")
    # Each of the 3 clients replied with its own rank: bytes up are those of ranks 4, 8 and 16.
    state = adapter_state(runtime.workbench(from_run_config(overrides)).model)
    expected = sum(to_record(resize_state(state, rank)).count_bytes() for rank in (4, 8, 16))
    assert all(entry["bytes-up"] == expected for entry in rounds[1:])
