"""ClientApp: train the received adapter on the node's private partition; send back only the adapter.

The base model stays cached in the worker process (:mod:`fedlora.runtime`);
each message overwrites the whole adapter with the one received, trains
``train.local-steps`` steps with a fresh optimizer at the round's learning rate,
and replies with the adapter tensors, ``num-examples``, ``train-loss`` and
``setup-s`` (seconds from the message's arrival to the first training step).

A node's profile is its LoRA rank (node config ``lora-rank``, else its tier
in ``adapter.rank-tiers``) and its task (node config ``task``, else its turn in
``data.tasks``); the client answers the server's profile query with it, and
per-node strategies send it an adapter of that rank and task. A client replies
with exactly the tensors and ranks it received, so the server decides every
size; any other trainable tensor is local: it continues from this client's
on-disk store and is saved back there after training. AdaLoRA clients add their
rank pattern (a ConfigRecord ``rank-pattern``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from datasets import Dataset
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import Tensor

import fedlora.quiet  # noqa: F401  # installs the third-party warning filters before fedlora loads
from fedlora import runtime
from fedlora.adapter import adapter_state, load_adapter_state, resize_like, split_residual, trainable_names
from fedlora.config import (
    RANK_KEY,
    TASK_KEY,
    RunConfig,
    client_rank,
    client_task,
    for_task,
    from_run_config,
    task_names,
)
from fedlora.training import evaluate, round_lr, train_steps
from fedlora.wire import from_record, to_record

app = ClientApp()


def _node_data(context: Context) -> tuple[int, int, str]:
    """``partition-id``, ``num-partitions`` and ``data-path`` from the node config.

    A node with ``data-path`` trains on that file (its private data); otherwise
    on partition ``partition-id`` of the run's data source (as in simulation).
    """
    config = context.node_config
    if "data-path" in config:
        return int(config.get("partition-id", 0)), 1, str(config["data-path"])
    try:
        return int(config["partition-id"]), int(config["num-partitions"]), ""
    except KeyError as err:
        raise ValueError(
            f"node config lacks {err}; start the SuperNode with --node-config "
            '"partition-id=<i> num-partitions=<n>" or "data-path=<file>"'
        ) from None


@dataclass
class Received:
    """A message unpacked on this node: the model with the adapter loaded, the node's data, what came in."""

    cfg: RunConfig
    bench: runtime.Workbench
    train_set: Dataset
    val_set: Dataset
    sent: dict[str, Tensor]  # the trainable tensors the server sent: the reply has exactly these keys and shapes
    server_round: int


def _profile(cfg: RunConfig, context: Context) -> tuple[int, str]:
    """The node's LoRA rank and task, from its node config or the run's tiers and task list."""
    partition_id = _node_data(context)[0]
    node_rank, node_task = context.node_config.get(RANK_KEY), context.node_config.get(TASK_KEY)
    rank = client_rank(cfg, partition_id, None if node_rank is None else int(node_rank))
    return rank, client_task(cfg, partition_id, None if node_task is None else str(node_task))


def _task_data(cfg: RunConfig, context: Context, task: str) -> tuple[Dataset, Dataset]:
    """The node's (train, val) sets; with tasks, its share of its task's data set among that task's partitions."""
    partition_id, num_partitions, data_path = _node_data(context)
    if task and not data_path:
        tasks = task_names(cfg)
        if task not in tasks:
            raise ValueError(f"node task '{task}' is not one of data.tasks={','.join(tasks)}")
        position = tasks.index(task)
        cfg = for_task(cfg, task)
        partition_id, num_partitions = partition_id // len(tasks), len(range(position, num_partitions, len(tasks)))
    return runtime.client_sets(cfg, partition_id, num_partitions, data_path)


def _receive(msg: Message, context: Context) -> Received:
    """Unpack ``msg``: activate the node's task, load the adapter sent plus this client's local tensors."""
    cfg = from_run_config(context.run_config)
    bench = runtime.workbench(cfg)
    _, task = _profile(cfg, context)
    bench.method.activate(bench.model, task)
    train_set, val_set = _task_data(cfg, context, task)
    state = from_record(msg.content["arrays"])
    server_round = int(msg.content["config"]["server-round"])
    trainable, _ = split_residual(state)
    local = [k for k in trainable_names(bench.model) if k not in trainable]  # no copy on every message
    if local:  # tensors the strategy keeps on the client: the last ones this client trained, else the initial ones
        stored = runtime.load_local_tensors(cfg, context.node_config, server_round, msg.metadata.message_type)
        state = {**{k: (stored or {}).get(k, bench.initial[k]) for k in local}, **state}
    load_adapter_state(bench.model, state)
    return Received(cfg, bench, train_set, val_set, trainable, server_round)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Answer the server's profile query: this node's LoRA rank and task."""
    rank, task = _profile(from_run_config(context.run_config), context)
    return Message(content=RecordDict({"profile": ConfigRecord({RANK_KEY: rank, TASK_KEY: task})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training."""
    started = time.monotonic()
    got = _receive(msg, context)
    cfg, bench, server_round = got.cfg, got.bench, got.server_round
    partition_id, _, _ = _node_data(context)
    seed = cfg.run.seed + 7919 * server_round + 104729 * partition_id  # dropout and batch order
    torch.manual_seed(seed)
    lr = round_lr(server_round, cfg.run.num_server_rounds, cfg.train.lr, cfg.train.lr_min)
    optimizer = bench.method.optimizer(bench.model, cfg, lr)
    runtime.restore_optimizer_state(cfg, context.node_config, optimizer, bench.model, server_round)  # opt-in
    setup_s = time.monotonic() - started  # message to first training step: what the worker cache saves
    loss = train_steps(
        bench.model,
        bench.loader(got.train_set, cfg.train.batch_size, seed=seed),
        cfg.train.local_steps,
        optimizer,
        cfg.train.max_grad_norm,
        bench.method.step_hook(bench.model, cfg, server_round),
    )
    runtime.keep_optimizer_state(cfg, context.node_config, optimizer, bench.model, server_round)  # opt-in
    trained = adapter_state(bench.model)
    if local := {k: v for k, v in trained.items() if k not in got.sent}:
        runtime.save_local_tensors(cfg, context.node_config, server_round, local)
    reply = resize_like({k: trained[k] for k in got.sent}, got.sent)
    content = RecordDict(
        {
            "arrays": to_record(reply, cfg.wire.dtype),
            "metrics": MetricRecord({"num-examples": len(got.train_set), "train-loss": loss, "setup-s": setup_s}),
        }
    )
    if pattern := bench.method.rank_pattern(bench.model):
        content["rank-pattern"] = ConfigRecord(pattern)
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_adapter(msg: Message, context: Context) -> Message:
    """Evaluate the received adapter on the node's validation split."""
    got = _receive(msg, context)
    metrics = evaluate(got.bench.model, got.bench.loader(got.val_set, got.cfg.eval.batch_size), got.bench.task)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
