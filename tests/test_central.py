"""Central evaluation on a worker: the same numbers as the ServerApp's own, and a ServerApp left with no base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.superlink.grid.inmemory_grid import InMemoryGrid
from safetensors.torch import load_file

from client_app.app import evaluate_adapter
from fedlora import central, runtime
from fedlora.adapter import adapter_state, drop_base_weights, load_adapter_state
from fedlora.config import ConfigError, from_run_config
from fedlora.keys import ARRAYS, CENTRAL, CONFIG, SERVER_ROUND
from fedlora.report import save_adapter
from fedlora.wire import to_record
from simulations.inprocess import run_in_process


def llama_run(tiny_llama: Path, **extra: object) -> dict:
    return {
        "model.name": str(tiny_llama),
        "data.source": "chatterbot",
        "data.max-examples": 200,
        "data.test-size": 12,
        "num-server-rounds": 2,
        "fraction-evaluate": 0.0,
        "train.local-steps": 2,
        "train.batch-size": 4,
        "train.max-length": 48,
        "train.lr": 0.01,
        **extra,
    }


@pytest.mark.slow
def test_a_worker_computes_the_central_evaluation_the_server_would(tmp_path: Path, tiny_llama: Path) -> None:
    results = {}
    for where in ("server", "worker"):
        runtime.clear_caches()
        overrides = llama_run(tiny_llama, **{"eval.central": where, "output-dir": str(tmp_path / where)})
        rounds = run_in_process(overrides, nodes=2)
        results[where] = [r["server-eval"] for r in rounds]
        assert all("evaluate-sampled" not in r.get("clients", {}) for r in rounds)  # not counted as a client's
    assert results["worker"] == [pytest.approx(m, rel=1e-6) for m in results["server"]]
    assert results["worker"][0]["num-examples"] == 12
    assert results["worker"][2]["eval-loss"] < results["worker"][0]["eval-loss"]  # it evaluated trained adapters
    server, worker = (load_file(tmp_path / w / "adapter" / "adapter_model.safetensors") for w in ("server", "worker"))
    assert server.keys() == worker.keys() and all(torch.equal(server[k], worker[k]) for k in server)


@pytest.mark.usefixtures("flower_identity")
def test_a_central_request_is_answered_on_the_servers_test_split(tiny_llama: Path) -> None:
    overrides = llama_run(tiny_llama)
    cfg = from_run_config(overrides)
    state = adapter_state(runtime.workbench(cfg).model)
    content = RecordDict({ARRAYS: to_record(state), CONFIG: ConfigRecord({SERVER_ROUND: 1, CENTRAL: True})})
    request = Message(content=content, dst_node_id=5, message_type=MessageType.EVALUATE)
    request.metadata.__dict__["_message_id"] = "m1"
    node_config = {"partition-id": 0, "num-partitions": 2}
    reply = evaluate_adapter(request, Context(1, 5, node_config, RecordDict(), overrides))
    expected = central.evaluate_tasks(runtime.workbench(cfg), cfg, state)
    assert central.read_worker_reply(cfg, reply.content) == {"": pytest.approx(expected[""], rel=1e-6)}
    assert expected[""]["num-examples"] == 12  # the test split, not the node's validation split


@pytest.mark.parametrize("method", ["lora", "lora-fa"])
def test_the_adapter_survives_dropping_the_base(tmp_path: Path, tiny_llama: Path, method: str) -> None:
    cfg = from_run_config({"model.name": str(tiny_llama), "adapter.method": method})
    model = runtime.workbench(cfg, reuse=False).model
    state = {k: v + 0.5 for k, v in adapter_state(model).items()}
    load_adapter_state(model, state)
    save_adapter(model, tmp_path / "full")
    drop_base_weights(model)
    base = [n for n, p in model.named_parameters() if "lora_" not in n]
    assert base and all(p.is_meta for n, p in model.named_parameters() if n in base)
    assert not any(p.is_meta for n, p in model.named_parameters() if n not in base)  # LoRA-FA's frozen A stays
    load_adapter_state(model, state)  # still takes a global adapter...
    save_adapter(model, tmp_path / "dropped")  # ...and writes it as before
    full, dropped = (load_file(tmp_path / f / "adapter_model.safetensors") for f in ("full", "dropped"))
    assert full.keys() == dropped.keys() and all(torch.equal(full[k], dropped[k]) for k in full)
    configs = [json.loads((tmp_path / f / "adapter_config.json").read_text()) for f in ("full", "dropped")]
    assert configs[0] == configs[1]


def test_central_placement_is_a_worker_in_simulation_only_by_default() -> None:
    simulation = object.__new__(InMemoryGrid)  # the grid type Flower's simulation hands the ServerApp
    deployment = object()  # anything else: a deployed ServerApp's grid talks to a SuperLink
    auto = from_run_config({})
    assert central.placement(auto, simulation) == "worker"  # type: ignore[arg-type]
    assert central.placement(auto, deployment) == "server"  # type: ignore[arg-type]
    assert central.placement(from_run_config({"eval.central": "server"}), simulation) == "server"  # type: ignore[arg-type]
    assert central.placement(from_run_config({"eval.central": "worker"}), deployment) == "worker"  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"eval\.central"):
        from_run_config({"eval.central": "elsewhere"})
