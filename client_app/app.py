"""ClientApp: train the received adapter on the node's private partition; send back only the adapter.

The base model stays cached in the worker process (:mod:`fedlora.runtime`);
each message overwrites the whole adapter with the one received, trains
``train.local-steps`` steps with a fresh optimizer at the round's learning rate,
and replies with the adapter tensors, ``num-examples``, ``train-loss`` and
``setup-s`` (seconds from the message's arrival to the first training step).
"""

from __future__ import annotations

import time

import torch
from datasets import Dataset
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora import runtime
from fedlora.adapter import adapter_state, load_adapter_state
from fedlora.config import RunConfig, from_run_config
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


def _receive(msg: Message, context: Context) -> tuple[RunConfig, runtime.Workbench, Dataset, Dataset]:
    """Config, the cached model with the received adapter loaded, and this node's (train, val) sets."""
    cfg = from_run_config(context.run_config)
    bench = runtime.workbench(cfg)
    train_set, val_set = runtime.client_sets(cfg, *_node_data(context))
    load_adapter_state(bench.model, from_record(msg.content["arrays"]))
    return cfg, bench, train_set, val_set


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training."""
    started = time.monotonic()
    cfg, bench, train_set, _ = _receive(msg, context)
    server_round = int(msg.content["config"]["server-round"])
    partition_id, _, _ = _node_data(context)
    seed = cfg.run.seed + 7919 * server_round + 104729 * partition_id  # dropout and batch order
    torch.manual_seed(seed)
    lr = round_lr(server_round, cfg.run.num_server_rounds, cfg.train.lr, cfg.train.lr_min)
    optimizer = bench.method.optimizer(bench.model, cfg, lr)
    setup_s = time.monotonic() - started  # message to first training step: what the worker cache saves
    loss = train_steps(
        bench.model,
        bench.loader(train_set, cfg.train.batch_size, seed=seed),
        cfg.train.local_steps,
        optimizer,
        cfg.train.max_grad_norm,
    )
    content = RecordDict(
        {
            "arrays": to_record(adapter_state(bench.model), cfg.wire.dtype),
            "metrics": MetricRecord({"num-examples": len(train_set), "train-loss": loss, "setup-s": setup_s}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_adapter(msg: Message, context: Context) -> Message:
    """Evaluate the received adapter on the node's validation split."""
    cfg, bench, _, val_set = _receive(msg, context)
    metrics = evaluate(bench.model, bench.loader(val_set, cfg.eval.batch_size), bench.task)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
