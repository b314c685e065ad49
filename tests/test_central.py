"""Central evaluation on a worker: the same numbers as the ServerApp's own, and a ServerApp left with no base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict
from safetensors.torch import load_file

from client_app.app import evaluate_adapter, train
from fedlora import runtime
from fedlora.adapter import adapter_state, drop_base_weights, load_adapter_state
from fedlora.config import ConfigError, from_run_config
from fedlora.keys import CENTRAL, CONFIG
from fedlora.report import save_adapter
from server_app.app import run_server


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


class WorkerGrid:
    """Nodes 5 and 6 (partitions 0 and 1) answer through the real ClientApp, in this process."""

    pull_interval = 0.0

    def __init__(self, run_config: dict) -> None:
        self.run_config = run_config
        self.replies: list[Message] = []
        self.central_requests = 0

    def _answer(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        node_config = {"partition-id": node - 5, "num-partitions": 2}
        context = Context(
            run_id=1, node_id=node, node_config=node_config, state=RecordDict(), run_config=self.run_config
        )
        if message.metadata.message_type == MessageType.TRAIN:
            return train(message, context)
        self.central_requests += 1
        assert message.content[CONFIG].get(CENTRAL)  # fraction-evaluate = 0: no client evaluation
        return evaluate_adapter(message, context)

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = f"m{len(self.replies)}"
            ids.append(message.metadata.message_id)
            self.replies.append(self._answer(message))
        return ids

    def pull_messages(self, ids: set[str]) -> list[Message]:
        found = [r for r in self.replies if r.metadata.reply_to_message_id in ids]
        self.replies = [r for r in self.replies if r not in found]
        return found

    def send_and_receive(self, messages: list[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(set(self.push_messages(messages)))

    def get_node_ids(self) -> list[int]:
        return [6, 5]


@pytest.mark.slow
@pytest.mark.usefixtures("flower_identity")
def test_a_worker_computes_the_central_evaluation_the_server_would(tmp_path: Path, tiny_llama: Path) -> None:
    runtime.clear_caches()
    results = {}
    for where in ("server", "worker"):
        overrides = llama_run(tiny_llama, **{"eval.central": where, "output-dir": str(tmp_path / where)})
        grid = WorkerGrid(overrides)
        run_server(grid, from_run_config(overrides))  # type: ignore[arg-type]
        rounds = json.loads((tmp_path / where / "metrics.json").read_text())["rounds"]
        results[where] = [r["server-eval"] for r in rounds]
        assert grid.central_requests == (3 if where == "worker" else 0)  # rounds 0, 1 and 2
        assert all("evaluate-sampled" not in r.get("clients", {}) for r in rounds)  # not counted as a client's
    assert results["worker"] == [pytest.approx(m, rel=1e-6) for m in results["server"]]
    assert results["worker"][0]["num-examples"] == 12
    assert results["worker"][2]["eval-loss"] < results["worker"][0]["eval-loss"]  # it evaluated trained adapters
    server, worker = (load_file(tmp_path / w / "adapter" / "adapter_model.safetensors") for w in ("server", "worker"))
    assert server.keys() == worker.keys() and all(torch.equal(server[k], worker[k]) for k in server)


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


def test_central_placement_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"eval\.central"):
        from_run_config({"eval.central": "elsewhere"})
