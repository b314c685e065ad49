"""Secure aggregation (SecAgg+) and client-level differential privacy: the maths, the messages, the refusals."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import reply
from e2e import check_run, simulate
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from opacus.accountants import RDPAccountant
from test_multitask import global_state as mtlora_state
from test_multitask import task_keys
from test_simulation import TINY_RUN
from test_strategies import R, lora_state

from fedlora.config import ConfigError, DPSettings, SecAggSettings, from_run_config
from fedlora.keys import ARRAYS, MASKED, SECAGG_TRAIN
from fedlora.privacy import dp, secagg
from fedlora.privacy.secagg import ProtocolError, ServerSession
from fedlora.wire import from_record, to_record
from simulations.bench_privacy import ProtocolGrid
from strategies import AdapterStrategy, FedAvgFactors, FedSA, LocalOnly, MTLoRA, build_strategy
from strategies.base import NodeProfile

CLIP, LEVELS = 1.0, 2**22
BOUND = 2 * CLIP / LEVELS  # the secure mean is within this of the plain one, per value
SETTINGS = SecAggSettings(enabled=True, dropout_fraction=0.4)


def protocol(
    updates: dict[int, np.ndarray],
    weights: dict[int, int],
    before: Iterable[int] = (),
    after: Iterable[int] = (),
    corrupt: tuple[int, int] | None = None,
    dropout_fraction: float = 0.4,
) -> tuple[ServerSession, np.ndarray, dict[int, np.ndarray]]:
    """One round of the protocol's maths: clients in ``before`` drop before their masked upload, ``after`` after it.

    ``corrupt=(sender, holder)`` garbles the share ``sender`` encrypted for ``holder``. Returns the server's
    session, the decoded mean and the masked inputs it received.
    """
    server = ServerSession(sorted(updates), 0, dropout_fraction, seed=1)
    clients = {}
    for i in updates:
        clients[i], encryption, mask = secagg.client_keys(i)
        server.add_keys(i, encryption, mask)
    for i, peers in server.share_requests().items():
        ciphertexts, commitment = secagg.client_shares(clients[i], peers, server.threshold)
        if corrupt and corrupt[0] == i:
            ciphertexts[corrupt[1]] = b"garbage" + ciphertexts[corrupt[1]][7:]
        server.add_shares(i, ciphertexts, commitment)
    masked, rejected = {}, {}
    for i, shares in server.forwards().items():
        rejected[i] = secagg.client_receive(clients[i], shares)
        if i not in before:
            masked[i] = secagg.client_mask(clients[i], updates[i], weights[i], CLIP, LEVELS)
    alive, dropped = server.unmask_request(masked, rejected)
    shares = {i: secagg.client_unmask(clients[i], alive, dropped) for i in alive if i not in after}
    mean, _ = secagg.decode(server.unmask(masked, shares), CLIP, LEVELS)
    return server, mean, masked


def plain_mean(updates: dict[int, np.ndarray], weights: dict[int, int], clients: Iterable[int]) -> np.ndarray:
    clients = list(clients)
    return sum(weights[i] * updates[i] for i in clients) / sum(weights[i] for i in clients)


def random_round(n: int = 5, size: int = 300, seed: int = 0) -> tuple[dict[int, np.ndarray], dict[int, int]]:
    gen = np.random.default_rng(seed)
    clients = range(1, n + 1)
    return {i: gen.uniform(-0.9, 0.9, size) for i in clients}, {i: int(gen.integers(1, 40)) for i in clients}


def test_secure_mean_equals_the_plain_weighted_mean_within_the_quantisation_bound() -> None:
    updates, weights = random_round()
    _, mean, _ = protocol(updates, weights)
    error = np.abs(mean - plain_mean(updates, weights, updates))
    assert error.max() < BOUND
    assert error.max() > 0  # quantised: not the float mean by accident of a plain sum


def test_a_masked_input_reveals_nothing_of_its_update() -> None:
    updates, weights = random_round()
    other = {**updates, 1: -updates[1]}
    _, _, first = protocol(updates, weights)
    _, _, second = protocol(other, weights)
    encoded = [secagg.encode(u[1], weights[1], CLIP, LEVELS) for u in (updates, other)]
    # the masked difference is not the updates' encoded difference (fresh masks each round)...
    assert not np.array_equal(first[1] - second[1], encoded[0] - encoded[1])
    # ...and a masked input is spread over the whole ring, while an encoding is below T·weight
    assert encoded[0].max() <= LEVELS * weights[1]
    assert 0.4 < np.mean(first[1] >= np.uint64(2**63)) < 0.6


def test_the_sum_survives_one_dropout_before_the_upload_and_one_after() -> None:
    updates, weights = random_round()
    server, mean, _ = protocol(updates, weights, before=[2], after=[4])
    assert server.alive == [1, 3, 4, 5] and server.dropped == [2] and server.threshold == 3
    assert np.abs(mean - plain_mean(updates, weights, [1, 3, 4, 5])).max() < BOUND


def test_too_many_dropouts_fail_cleanly() -> None:
    updates, weights = random_round()
    with pytest.raises(ProtocolError, match="fewer than 3"):
        protocol(updates, weights, after=[1, 2, 3])


def test_a_malformed_share_excludes_its_sender_with_a_reason() -> None:
    updates, weights = random_round()
    server, mean, _ = protocol(updates, weights, corrupt=(2, 4))
    assert "client 4 says its share does not decrypt" in server.excluded[2]
    assert server.alive == [1, 3, 4, 5]
    assert np.abs(mean - plain_mean(updates, weights, [1, 3, 4, 5])).max() < BOUND


def test_a_wrong_share_at_unmasking_fails_the_round_never_a_wrong_sum() -> None:
    updates, weights = random_round()
    server = ServerSession(sorted(updates), 0, 0.4, seed=1)
    clients = {}
    for i in updates:
        clients[i], encryption, mask = secagg.client_keys(i)
        server.add_keys(i, encryption, mask)
    for i, peers in server.share_requests().items():
        server.add_shares(i, *secagg.client_shares(clients[i], peers, server.threshold))
    masked = {}
    for i, shares in server.forwards().items():
        secagg.client_receive(clients[i], shares)
        masked[i] = secagg.client_mask(clients[i], updates[i], weights[i], CLIP, LEVELS)
    alive, dropped = server.unmask_request(masked, {})
    shares = {i: secagg.client_unmask(clients[i], alive, dropped) for i in alive}
    seeds, keys = shares[3]
    shares[3] = ({j: s[:4] + bytes(len(s) - 4) for j, s in seeds.items()}, keys)  # wrong values, right form
    wrong = r"client 1's (self-mask seed cannot be rebuilt|rebuilt self-mask seed does not match)"
    with pytest.raises(ProtocolError, match=wrong):
        server.unmask(masked, shares)


def test_a_client_never_reveals_both_secrets_of_one_client() -> None:
    secrets, _, _ = secagg.client_keys(1)
    with pytest.raises(ProtocolError, match="both secrets"):
        secagg.client_unmask(secrets, [2, 3], [3])


def test_secagg_plus_graph_is_symmetric_and_k_regular() -> None:
    graph = secagg.neighbours(range(1, 21), 6, seed=3)
    assert all(len(peers) == 6 for peers in graph.values())
    assert all(i in graph[j] for i, peers in graph.items() for j in peers)


# --- through the strategy and Flower messages ---------------------------------------------------------------------


def small_updates(nodes: Iterable[int]) -> dict[int, dict[str, np.ndarray]]:
    gen = np.random.default_rng(9)
    return {n: {k: gen.uniform(-0.1, 0.1, v.shape).astype(np.float32) for k, v in lora_state(0).items()} for n in nodes}


def global_arrays() -> ArrayRecord:
    return to_record({k: torch.from_numpy(v) for k, v in lora_state(0).items()})


@pytest.mark.usefixtures("flower_identity")
def test_a_secure_round_of_the_strategy_matches_plain_fedavg_despite_dropouts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    nodes = [11, 12, 13, 14, 15]
    updates, weights = small_updates(nodes), dict(zip(nodes, [3, 1, 4, 1, 5], strict=True))
    grid = ProtocolGrid(updates, weights, SETTINGS, secagg={12}, secagg_unmask={14})
    strategy = FedAvgFactors(min_train_nodes=5, min_available_nodes=5, secagg=grid.settings)
    messages = strategy.configure_train(1, global_arrays(), ConfigRecord(), grid)
    assert {m.metadata.message_type for m in messages} == {f"train.{SECAGG_TRAIN}"}
    with caplog.at_level(logging.WARNING):
        arrays, metrics = strategy.aggregate_train(1, grid.send_and_receive(messages))
    assert arrays is not None and metrics is not None
    included = [11, 13, 14, 15]  # 12 failed training; 14 left after its masked input
    initial = lora_state(0)
    expected = {k: v + plain_mean({n: updates[n][k] for n in included}, weights, included) for k, v in initial.items()}
    for key, value in from_record(arrays).items():
        np.testing.assert_allclose(value.numpy(), expected[key], atol=BOUND + 1e-6)
    assert metrics["excluded-replies"] == 1 and metrics["secagg-late-dropouts"] == 1
    assert metrics["secagg-bytes-down"] > 0 and metrics["secagg-bytes-up"] > 0
    assert "reply from node 12 excluded: client failed: node went away" in caplog.text
    assert "node 14 dropped out after its masked input (which still counts)" in caplog.text


@pytest.mark.usefixtures("flower_identity")
def test_a_malformed_masked_reply_is_excluded_and_the_round_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    nodes = [1, 2, 3, 4, 5]
    updates, weights = small_updates(nodes), dict.fromkeys(nodes, 2)
    grid = ProtocolGrid(updates, weights, SETTINGS)
    strategy = FedAvgFactors(min_train_nodes=5, min_available_nodes=5, secagg=grid.settings)
    replies = grid.send_and_receive(strategy.configure_train(1, global_arrays(), ConfigRecord(), grid))
    bad = next(r for r in replies if r.metadata.src_node_id == 3).content[ARRAYS]
    bad[next(iter(bad))] = type(bad[next(iter(bad))])(np.zeros(7, dtype=np.uint64))
    with caplog.at_level(logging.WARNING):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert "reply from node 3 excluded: secure aggregation: masked input is uint64 (7,)" in caplog.text
    included = [1, 2, 4, 5]
    out = from_record(arrays)
    for key, value in lora_state(0).items():
        mean = plain_mean({n: updates[n][key] for n in included}, weights, included)
        np.testing.assert_allclose(out[key].numpy(), value + mean, atol=BOUND + 1e-6)
    assert metrics["excluded-replies"] == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"strategy.name": "fedavg-products"}, "the mean of the products B_k·A_k needs each client's factors"),
        ({"strategy.name": "flora"}, "strategy.name='flora' cannot run on a sum of updates"),
        ({"strategy.robust": "median"}, "strategy.robust='median' needs each client's update"),
        ({"cohort.clients": 8, "cohort.size": 4}, "cohort.clients"),
    ],
)
def test_what_needs_individual_updates_is_refused(overrides: dict, message: str) -> None:
    for switch in ({"secagg.enabled": True}, {"dp.clip-norm": 1.0}):
        with pytest.raises(ConfigError, match=re.escape(message)):
            build_strategy(from_run_config({**switch, **overrides}))


def test_lora_fa_makes_product_averaging_a_sum() -> None:
    cfg = from_run_config({"secagg.enabled": True, "strategy.name": "fedavg-products", "adapter.method": "lora-fa"})
    assert build_strategy(cfg).secagg is not None


# --- differential privacy -----------------------------------------------------------------------------------------


def plain_replies(states: dict[int, dict[str, np.ndarray]], weight: int = 4) -> list[Message]:
    return [reply(node, state, weight) for node, state in states.items()]


@pytest.mark.usefixtures("flower_identity")
def test_dp_without_noise_or_binding_clip_is_the_plain_run() -> None:
    states = {n: {k: v + u[k] for k, v in lora_state(0).items()} for n, u in small_updates([11, 12, 13]).items()}
    results = []
    grid = ProtocolGrid(small_updates([11, 12, 13]), {}, SETTINGS)
    for privacy in (None, DPSettings(clip_norm=1e6, noise_multiplier=0.0)):
        strategy = FedAvgFactors(min_train_nodes=3, min_available_nodes=3, privacy=privacy)
        strategy.configure_train(1, global_arrays(), ConfigRecord(), grid)
        arrays, metrics = strategy.aggregate_train(1, plain_replies(states))
        results.append(from_record(arrays))
    for key in results[0]:
        torch.testing.assert_close(results[1][key], results[0][key], rtol=0, atol=1e-6)
    assert metrics["dp-epsilon"] == float("inf")  # no noise: no privacy, and the log says so


def test_clipping_bounds_the_update_and_noise_has_the_stated_scale() -> None:
    updates = [np.full(10_000, 1.0), np.full(10_000, -0.001)]
    assert np.linalg.norm(dp.clip(updates[0], 2.0)) == pytest.approx(2.0)
    np.testing.assert_array_equal(dp.clip(updates[1], 2.0), updates[1])
    noisy = dp.noisy_mean(updates, 2.0, 0.5) - dp.noisy_mean(updates, 2.0, 0.0)
    assert np.std(noisy) == pytest.approx(0.5 * 2.0 / 2, rel=0.05)  # σ·C on the sum, over 2 clients


@pytest.mark.usefixtures("flower_identity")
def test_epsilon_grows_with_rounds_as_the_accountant_says() -> None:
    nodes = [11, 12, 13, 14]
    strategy = FedAvgFactors(
        min_train_nodes=2, min_available_nodes=2, fraction_train=0.5, privacy=DPSettings(1.0, 1.1, 1e-5)
    )
    grid = ProtocolGrid(small_updates(nodes), {}, SETTINGS)
    epsilons = []
    for server_round in (1, 2, 3):
        messages = strategy.configure_train(server_round, global_arrays(), ConfigRecord(), grid)
        sampled = [m.metadata.dst_node_id for m in messages]
        states = {n: {k: v + grid.updates[n][k] for k, v in lora_state(0).items()} for n in sampled}
        strategy.aggregate_train(server_round, plain_replies(states))
        epsilons.append(strategy.round_log[server_round]["dp-epsilon"])
    accountant = RDPAccountant()
    for expected in epsilons:
        accountant.step(noise_multiplier=1.1, sample_rate=0.5)
        assert expected == pytest.approx(accountant.get_epsilon(1e-5))
    assert epsilons[0] < epsilons[1] < epsilons[2]


# --- end to end ---------------------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.slow
def test_flwr_run_with_secure_aggregation_and_a_dropout(tmp_path: Path, tiny_llama: Path) -> None:
    """Three clients; the one of partition 2 leaves after its masked upload every round: the sum is still recovered."""
    overrides, rounds = simulate(
        tmp_path,
        {
            **TINY_RUN,
            "model.name": str(tiny_llama),
            "min-train-nodes": 3,
            "secagg.enabled": True,
            "secagg.dropout-fraction": 0.4,
            "secagg.simulate-dropout": "unmask:2",
        },
    )
    check_run(overrides, rounds, "eval-perplexity")
    for entry in rounds[1:]:
        assert entry["secagg-late-dropouts"] == 1
        assert entry["clients"]["train-replies"] == 3 and entry["clients"]["query-replies"] == 3 * 3 - 1
        assert entry["secagg-bytes-down"] > 0 and entry["secagg-bytes-up"] > 0


@pytest.mark.usefixtures("flower_identity")
def test_dp_under_secure_aggregation_without_noise_is_the_plain_equal_weight_mean() -> None:
    nodes = [1, 2, 3, 4, 5]
    updates = small_updates(nodes)
    privacy = DPSettings(clip_norm=1e6, noise_multiplier=0.0)
    grid = ProtocolGrid(updates, dict(zip(nodes, [1, 2, 3, 4, 50], strict=True)), SETTINGS, privacy)
    strategy = FedAvgFactors(min_train_nodes=5, min_available_nodes=5, secagg=SETTINGS, privacy=privacy)
    arrays, metrics = strategy.aggregate_train(
        1, grid.send_and_receive(strategy.configure_train(1, global_arrays(), ConfigRecord(), grid))
    )
    out = from_record(arrays)
    for key, value in lora_state(0).items():  # equal weights under DP, whatever the examples
        np.testing.assert_allclose(out[key].numpy(), value + np.mean([updates[n][key] for n in nodes], 0), atol=BOUND)
    assert metrics["dp-epsilon"] == float("inf") and metrics["dp-noise-multiplier"] == 0.0


# --- secure sums per group (scoped strategies) -------------------------------------------------------------------


def scoped_round(
    strategy: AdapterStrategy, tasks: dict[int, str], state: dict[str, np.ndarray], grid: ProtocolGrid
) -> tuple[dict[str, torch.Tensor], MetricRecord, list[Message]]:
    """One training round of ``strategy`` over nodes of ``tasks`` (profiles known): the new adapter, its metrics."""
    strategy.profiles = {node: NodeProfile(R, task) for node, task in tasks.items()}
    arrays = to_record({k: torch.from_numpy(v) for k, v in state.items()})
    messages = strategy.configure_train(1, arrays, ConfigRecord(), grid)
    replies = grid.send_and_receive(messages)
    new, metrics = strategy.aggregate_train(1, replies)
    assert new is not None and metrics is not None
    return from_record(new), metrics, replies


def plain_twin(
    strategy_cls: type, profiles: dict[int, str], state: dict, grid: ProtocolGrid, nodes: list[int], **kw: object
) -> dict[str, torch.Tensor]:
    """The same round without secure aggregation, aggregating only the replies of ``nodes``."""
    strategy = strategy_cls(min_train_nodes=len(profiles), min_available_nodes=len(profiles), **kw)
    strategy.profiles = {node: NodeProfile(R, task) for node, task in profiles.items()}
    arrays = to_record({k: torch.from_numpy(v) for k, v in state.items()})
    replies = grid.send_and_receive(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    new, _ = strategy.aggregate_train(1, [r for r in replies if r.metadata.src_node_id in nodes])
    return from_record(new)


@pytest.mark.usefixtures("flower_identity")
def test_a_secure_mtlora_round_sums_each_task_over_its_own_clients_despite_dropouts() -> None:
    tasks = {11: "a", 12: "a", 13: "a", 14: "b", 15: "b", 16: "b"}
    state = mtlora_state(0)
    gen = np.random.default_rng(3)
    updates = {n: {k: gen.uniform(-0.1, 0.1, v.shape).astype(np.float32) for k, v in state.items()} for n in tasks}
    weights = dict(zip(tasks, [3, 1, 4, 1, 5, 9], strict=True))
    grid = ProtocolGrid(updates, weights, SETTINGS, secagg={12}, secagg_unmask={15})  # 12 before, 15 after upload
    strategy = MTLoRA(tasks=("a", "b"), min_train_nodes=6, min_available_nodes=6, secagg=SETTINGS)
    out, metrics, replies = scoped_round(strategy, tasks, state, grid)
    included = [11, 13, 14, 15, 16]
    expected = plain_twin(MTLoRA, tasks, state, ProtocolGrid(updates, weights, SETTINGS), included, tasks=("a", "b"))
    for key, value in out.items():
        np.testing.assert_allclose(value.numpy(), expected[key].numpy(), atol=BOUND + 1e-6, err_msg=key)
    a_key = task_keys("a")[0]  # task a's tensors move by task a's clients' mean alone
    mean_a = plain_mean({n: updates[n][a_key] for n in (11, 13)}, weights, (11, 13))
    np.testing.assert_allclose(out[a_key].numpy(), state[a_key] + mean_a, atol=BOUND + 1e-6)
    masked = next(r for r in replies if r.metadata.src_node_id == 11).content[ARRAYS][MASKED].numpy()
    assert masked.size == sum(v.size for v in state.values()) + 3  # every group's segment, then 3 weights
    assert metrics["excluded-replies"] == 1 and metrics["secagg-late-dropouts"] == 1


@pytest.mark.usefixtures("flower_identity")
def test_a_secure_fedsa_round_sums_a_over_every_client_and_b_never_travels() -> None:
    nodes = {1: "", 2: "", 3: "", 4: "", 5: ""}
    state = lora_state(0)
    updates, weights = small_updates(nodes), dict(zip(nodes, [2, 7, 1, 8, 2], strict=True))
    grid = ProtocolGrid(updates, weights, SETTINGS, secagg={2}, secagg_unmask={4})
    strategy = FedSA(min_train_nodes=5, min_available_nodes=5, secagg=SETTINGS)
    out, metrics, replies = scoped_round(strategy, nodes, state, grid)
    expected = plain_twin(FedSA, nodes, state, ProtocolGrid(updates, weights, SETTINGS), [1, 3, 4, 5])
    for key, value in out.items():
        np.testing.assert_allclose(value.numpy(), expected[key].numpy(), atol=BOUND + 1e-6, err_msg=key)
    np.testing.assert_array_equal(out["m.q.lora_B.weight"].numpy(), state["m.q.lora_B.weight"])  # local
    assert not np.allclose(out["m.q.lora_A.weight"].numpy(), state["m.q.lora_A.weight"])
    masked = next(r for r in replies if r.metadata.src_node_id == 1).content[ARRAYS][MASKED].numpy()
    assert masked.size == state["m.q.lora_A.weight"].size + state["head.weight"].size + 1  # no B, one group
    assert metrics["excluded-replies"] == 1 and metrics["secagg-late-dropouts"] == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"strategy.name": "mtlora", "strategy.within": "fedavg-products"}, "strategy.within='fedavg-products': the"),
        ({"strategy.name": "local-only", "strategy.robust": "median"}, "strategy.robust='median'"),
    ],
)
def test_a_scope_that_is_not_a_mean_is_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_strategy(from_run_config({"secagg.enabled": True, **overrides}))


@pytest.mark.parametrize(
    "overrides",
    [
        {"strategy.name": "mtlora"},
        {"strategy.name": "mtlora", "strategy.within": "fedavg-products", "adapter.method": "lora-fa"},
        {"strategy.name": "fedsa", "strategy.within": "fedavg-products"},
        {"strategy.name": "local-only"},
    ],
)
def test_scoped_strategies_run_under_secure_aggregation_where_exact(overrides: dict) -> None:
    assert build_strategy(from_run_config({"secagg.enabled": True, **overrides})).secagg is not None


def test_mtlora_refuses_dp_whose_noise_is_calibrated_for_one_sum() -> None:
    with pytest.raises(ConfigError, match="per-task noise is not implemented"):
        build_strategy(from_run_config({"dp.clip-norm": 1.0, "strategy.name": "mtlora"}))
    assert build_strategy(from_run_config({"dp.clip-norm": 1.0, "strategy.name": "fedsa"})).privacy is not None


def test_a_masked_input_carries_one_exact_sum_per_group() -> None:
    sizes = [3, 2, 4]  # global, task a, task b
    clients = {1: ([0, 1], 5), 2: ([0, 2], 2), 3: ([0, 1], 1)}  # each client's groups and weight
    gen = np.random.default_rng(0)
    values = {i: {g: gen.uniform(-0.5, 0.5, sizes[g]) for g in groups} for i, (groups, _) in clients.items()}
    total = np.zeros(sum(sizes) + len(sizes), dtype=np.uint64)
    for i, (groups, weight) in clients.items():
        tensors = [values[i][g] for g in groups]
        spread, group_weights = secagg.lay_out(
            np.concatenate(tensors), [t.size for t in tensors], groups, sizes, weight
        )
        assert group_weights == [weight if g in groups else 0 for g in range(3)]
        total += secagg.encode(spread, group_weights, CLIP, LEVELS, sizes)
    decoded = secagg.decode_groups(total, sizes, CLIP, LEVELS)
    for g in range(3):
        members = [i for i, (groups, _) in clients.items() if g in groups]
        member_weights = {i: clients[i][1] for i in members}
        mean = plain_mean({i: values[i][g] for i in members}, member_weights, members)
        np.testing.assert_allclose(decoded[g][0], mean, atol=BOUND)
        assert decoded[g][1] == sum(member_weights.values())
    with pytest.raises(ProtocolError, match="group 1: this client's tensors hold 3 values, expected 2"):
        secagg.lay_out(np.zeros(6), [3, 3], [0, 1], sizes, 1)


@pytest.mark.usefixtures("flower_identity")
def test_local_only_under_secure_aggregation_runs_no_protocol_as_nothing_travels() -> None:
    nodes = {1: "", 2: "", 3: ""}
    state = lora_state(0)
    grid = ProtocolGrid(small_updates(nodes), dict.fromkeys(nodes, 3), SETTINGS)
    strategy = LocalOnly(min_train_nodes=3, min_available_nodes=3, secagg=SETTINGS)
    out, metrics, replies = scoped_round(strategy, nodes, state, grid)
    assert {r.metadata.message_type for r in replies} == {"train"} and strategy.secure is None
    for key, value in state.items():
        np.testing.assert_array_equal(out[key].numpy(), value)
    assert "secagg-bytes-up" not in metrics
