"""ClientApp: train the received adapter on the node's private partition; send back only the adapter.

The base model stays cached in the worker process (:mod:`fedlora.runtime`);
each message overwrites the whole adapter with the one received, trains
``train.local-steps`` steps (or ``train.epochs`` passes) with a fresh optimizer at the round's learning rate
(pulled towards the received adapter with ``train.proximal-mu``, FedProx),
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

With ``cohort.clients`` set, a message may carry a *cohort* of virtual clients
(:mod:`fedlora.cohort.protocol`): the node is then a worker that trains each of
them as the client it names (its partition id), together in one batched pass
where the method allows (:mod:`fedlora.cohort.train`) and one after another
otherwise, and replies with one update per virtual client.

With ``secagg.enabled`` the client also answers the stages of secure
aggregation (:mod:`fedlora.privacy.rounds`): ``query.secagg_keys``,
``query.secagg_shares``, ``train.secagg`` (train, then reply with the masked
update instead of the adapter) and ``query.secagg_unmask``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import islice
from logging import INFO, WARNING
from typing import Any

import torch
from datasets import Dataset
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from torch import Tensor

import fedlora.quiet  # noqa: F401  # installs the third-party warning filters before fedlora loads
from fedlora import central, runtime
from fedlora.adapter import (
    adapter_state,
    fit_state,
    load_adapter_state,
    load_base_tensors,
    resize_like,
    trainable_names,
)
from fedlora.cohort import protocol, sequential_reason
from fedlora.cohort.train import CohortMember, train_cohort
from fedlora.config import RunConfig, client_rank, client_task, for_task, from_run_config, task_names
from fedlora.keys import (
    ARRAYS,
    CENTRAL,
    CONFIG,
    LAYER_IMPORTANCE,
    METRICS,
    NUM_EXAMPLES,
    PROFILE,
    RANK_KEY,
    RANK_PATTERN,
    SECAGG_KEYS,
    SECAGG_SHARES,
    SECAGG_TRAIN,
    SECAGG_UNMASK,
    SERVER_ROUND,
    TASK_KEY,
    TRAINABLE_LAYERS,
    base_part,
    trained_part,
)
from fedlora.privacy import rounds
from fedlora.selection import select
from fedlora.training import evaluate, round_lr, train_steps
from fedlora.wire import from_record, to_record

app = ClientApp()


NodeConfig = Mapping[str, Any]


def _node_data(node_config: NodeConfig) -> tuple[int, int, str]:
    """``partition-id``, ``num-partitions`` and ``data-path`` from the node config.

    A node with ``data-path`` trains on that file (its private data); otherwise
    on partition ``partition-id`` of the run's data source (as in simulation).
    """
    if "data-path" in node_config:
        return int(node_config.get("partition-id", 0)), 1, str(node_config["data-path"])
    try:
        return int(node_config["partition-id"]), int(node_config["num-partitions"]), ""
    except KeyError as err:
        raise ValueError(
            f"node config lacks {err}; start the SuperNode with --node-config "
            '"partition-id=<i> num-partitions=<n>" or "data-path=<file>"'
        ) from None


def virtual_client(cfg: RunConfig, client: int) -> NodeConfig:
    """The node config a virtual client of a cohort would have as a node of its own."""
    return {"partition-id": client, "num-partitions": cfg.cohort.clients}


@dataclass
class Received:
    """One client's part of a message: its data, what it was sent, and the adapter it starts from."""

    cfg: RunConfig
    bench: runtime.Workbench
    node_config: NodeConfig
    train_set: Dataset
    val_set: Dataset
    sent: dict[str, Tensor]  # the trainable tensors the server sent: the reply has exactly these keys and shapes
    start: dict[str, Tensor]  # sent, plus this client's local tensors and any base tensors: what it trains from
    server_round: int
    task: str
    measure_importance: bool = False  # the server asked for each layer's importance after training

    def load(self) -> None:
        """Make this client's adapter the model's: its task's adapters active, its tensors loaded."""
        self.bench.method.activate(self.bench.model, self.task)
        load_adapter_state(self.bench.model, self.start)

    @property
    def lr(self) -> float:
        """The round's learning rate (cosine over rounds)."""
        return round_lr(self.server_round, self.cfg.run.num_server_rounds, self.cfg.train.lr, self.cfg.train.lr_min)

    @property
    def seed(self) -> int:
        """Seed of this client's dropout and batch order in this round."""
        return self.cfg.run.seed + 7919 * self.server_round + 104729 * _node_data(self.node_config)[0]

    def loader(self, train: bool) -> torch.utils.data.DataLoader:
        """Shuffled training batches, or the validation batches."""
        if train:
            return self.bench.loader(self.train_set, self.cfg.train.batch_size, seed=self.seed)
        return self.bench.loader(self.val_set, self.cfg.eval.batch_size)


def _profile(cfg: RunConfig, node_config: NodeConfig) -> tuple[int, str]:
    """The node's LoRA rank and task, from its node config or the run's tiers and task list."""
    partition_id = _node_data(node_config)[0]
    node_rank, node_task = node_config.get(RANK_KEY), node_config.get(TASK_KEY)
    rank = client_rank(cfg, partition_id, None if node_rank is None else int(node_rank))
    return rank, client_task(cfg, partition_id, None if node_task is None else str(node_task))


def _task_data(cfg: RunConfig, node_config: NodeConfig, task: str) -> tuple[Dataset, Dataset]:
    """The node's (train, val) sets; with tasks, its share of its task's data set among that task's partitions."""
    partition_id, num_partitions, data_path = _node_data(node_config)
    if task and not data_path:
        tasks = task_names(cfg)
        if task not in tasks:
            raise ValueError(f"node task '{task}' is not one of data.tasks={','.join(tasks)}")
        position = tasks.index(task)
        cfg = for_task(cfg, task)
        partition_id, num_partitions = partition_id // len(tasks), len(range(position, num_partitions, len(tasks)))
    return runtime.client_sets(cfg, partition_id, num_partitions, data_path)


def receive(
    cfg: RunConfig,
    node_config: NodeConfig,
    arrays: ArrayRecord,
    server_round: int,
    message_type: str,
    instruction: Mapping[str, Any] | None = None,
) -> Received:
    """Unpack one client's adapter: activate its task and trained layers, add its local tensors (nothing loaded yet).

    ``instruction`` is the message's config: ``trainable-layers`` narrows what trains (every layer without it),
    ``layer-importance`` asks for the layers' importance after training.
    """
    bench = runtime.workbench(cfg)
    _, task = _profile(cfg, node_config)
    bench.method.activate(bench.model, task)
    instruction = instruction or {}
    layers = instruction.get(TRAINABLE_LAYERS)  # the tensors sent are these layers' (LoRA-drop after its drop)
    bench.method.train_layers(bench.model, None if layers is None else list(layers))
    train_set, val_set = _task_data(cfg, node_config, task)
    if message_type == MessageType.TRAIN and not len(train_set):
        raise ValueError(
            f"client {_node_data(node_config)[0]} has no training example left after tokenisation "
            f"(train.max-length={cfg.train.max_length} cuts every answer off?)"
        )
    state = from_record(arrays)
    select(bench.model, state)  # LISA: the trainable set is the message's, before the local tensors are told apart
    trainable = trained_part(state)
    local = [k for k in trainable_names(bench.model) if k not in trainable]  # no copy on every message
    if local:  # tensors the strategy keeps on the client: the last ones this client trained, else the initial ones
        stored = runtime.load_local_tensors(cfg, node_config, server_round, message_type)
        state = {**{k: (stored or {}).get(k, bench.initial[k]) for k in local}, **state}
    measure = bool(instruction.get(LAYER_IMPORTANCE, False))
    return Received(cfg, bench, node_config, train_set, val_set, trainable, state, server_round, task, measure)


def _reply_content(got: Received, trained: dict[str, Tensor], loss: float, setup_s: float) -> RecordDict:
    """A training reply: exactly the tensors (and ranks) sent; local tensors go to this client's store."""
    if local := {k: v for k, v in trained.items() if k not in got.sent}:
        runtime.save_local_tensors(got.cfg, got.node_config, got.server_round, local)
    reply = resize_like({k: trained[k] for k in got.sent}, got.sent)
    metrics = {NUM_EXAMPLES: len(got.train_set), "train-loss": loss, "setup-s": setup_s}
    content = RecordDict({ARRAYS: to_record(reply, got.cfg.wire.dtype), METRICS: MetricRecord(metrics)})
    if pattern := got.bench.method.rank_pattern(got.bench.model):
        content[RANK_PATTERN] = ConfigRecord(pattern)
    return content


def train_alone(got: Received, started: float) -> RecordDict:
    """One client's local training round on the worker's model; its reply content.

    Afterwards every layer trains again: the cached model at rest takes a whole adapter (an evaluation's).
    """
    try:
        return _train_alone(got, started)
    finally:
        got.bench.method.train_layers(got.bench.model, None)


def _train_alone(got: Received, started: float) -> RecordDict:
    cfg, bench, server_round = got.cfg, got.bench, got.server_round
    got.load()
    torch.manual_seed(got.seed)  # dropout; the loader has its own generator
    optimizer = bench.method.optimizer(bench.model, cfg, got.lr)
    runtime.restore_optimizer_state(cfg, got.node_config, optimizer, bench.model, server_round)  # opt-in
    setup_s = time.monotonic() - started  # message to first training step: what the worker cache saves
    loss = train_steps(
        bench.model,
        got.loader(train=True),
        cfg.train.local_steps,
        optimizer,
        cfg.train.max_grad_norm,
        bench.method.step_hook(bench.model, cfg, server_round),
        cfg.train.precision,
        cfg.train.grad_accumulation,
        cfg.train.epochs,
        cfg.train.proximal_mu,
    )
    runtime.keep_optimizer_state(cfg, got.node_config, optimizer, bench.model, server_round)  # opt-in
    content = _reply_content(got, adapter_state(bench.model), loss, setup_s)
    if got.measure_importance:  # on the first batches of this round's order: a sample of the client's data
        sample = islice(got.loader(train=True), cfg.loradrop.sample_batches)
        content[LAYER_IMPORTANCE] = ConfigRecord(bench.method.layer_importance(bench.model, sample))
    return content


def _same_tensors(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def train_together(members: dict[int, Received], started: float) -> dict[int, RecordDict | str]:
    """A cohort's local training round in one batched pass; each client's reply content (or why it failed)."""
    first = next(iter(members.values()))
    cfg, bench = first.cfg, first.bench
    fitted = {client: fit_state(bench.model, got.start) for client, got in members.items()}
    base = base_part(first.start)  # the strategy's (FLoRA's residual): global, so one for the whole cohort
    if any(not _same_tensors(base_part(got.start), base) for got in members.values()):
        raise ValueError("the clients of one cohort were sent different base tensors")
    load_base_tensors(bench.model, first.start)
    torch.manual_seed(first.seed)  # the cohort's dropout stream
    setup_s = time.monotonic() - started
    trained, losses = train_cohort(
        bench.model,
        [CohortMember(fitted[client], got.loader(train=True)) for client, got in members.items()],
        bench.method.optimizer(bench.model, cfg, first.lr),
        cfg.train.local_steps,
        cfg.train.max_grad_norm,
        bench.task,
        bench.tokenizer.pad_token_id,
        cfg.train.precision,
    )
    parts: dict[int, RecordDict | str] = {}
    for (client, got), state, loss in zip(members.items(), trained, losses, strict=True):
        parts[client] = (
            _reply_content(got, state, loss, setup_s)
            if not math.isnan(loss)  # NaN: this client's loss diverged (the others are unaffected)
            else "training loss became NaN or Inf; lower train.lr"
        )
    return parts


def _cohort(msg: Message, cfg: RunConfig) -> tuple[dict[int, Received], dict[int, str]]:
    """Each virtual client of a cohort message, unpacked; those that cannot even start, with the reason."""
    server_round = int(msg.content[CONFIG][SERVER_ROUND])
    members: dict[int, Received] = {}
    failed: dict[int, str] = {}
    for client, arrays in protocol.read_instruction(msg.content):
        try:
            members[client] = receive(cfg, virtual_client(cfg, client), arrays, server_round, msg.metadata.message_type)
        except ValueError as err:
            failed[client] = str(err)
    return members, failed


def _each(members: dict[int, Received], work: Callable[[Received], RecordDict]) -> dict[int, RecordDict | str]:
    """``work`` for each client in turn; a client that fails is reported in its place, not fatal to the others."""
    parts: dict[int, RecordDict | str] = {}
    for client, got in members.items():
        try:
            parts[client] = work(got)
        except (ValueError, FloatingPointError) as err:
            log(WARNING, "virtual client %d failed: %s", client, err)
            parts[client] = str(err)
    return parts


_logged_reasons: set[str] = set()


def _train_cohort(msg: Message, context: Context) -> Message:
    """Train every virtual client of a cohort message: batched where the method allows, else one by one."""
    started = time.monotonic()
    cfg = from_run_config(context.run_config)
    bench = runtime.workbench(cfg)
    reason = sequential_reason(cfg, bench.method, bench.model)
    members, parts = _cohort(msg, cfg)
    if not reason:
        parts |= train_together(members, started) if members else {}
    else:
        if reason not in _logged_reasons:  # once per worker
            _logged_reasons.add(reason)
            log(INFO, "cohorts are trained one client after another: %s", reason)
        parts |= _each(members, lambda got: train_alone(got, started))
    return Message(content=protocol.reply(parts), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Answer the server's profile query: this node's LoRA rank and task."""
    rank, task = _profile(from_run_config(context.run_config), context.node_config)
    return Message(content=RecordDict({PROFILE: ConfigRecord({RANK_KEY: rank, TASK_KEY: task})}), reply_to=msg)


def _single(msg: Message, context: Context) -> Received:
    """The client of an ordinary message: the node itself."""
    return receive(
        from_run_config(context.run_config),
        context.node_config,
        msg.content[ARRAYS],
        int(msg.content[CONFIG][SERVER_ROUND]),
        msg.metadata.message_type,
        msg.content[CONFIG],
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training: of this node, or of each virtual client of a cohort."""
    if protocol.is_cohort(msg.content):
        return _train_cohort(msg, context)
    started = time.monotonic()
    return Message(content=train_alone(_single(msg, context), started), reply_to=msg)


def _evaluate(got: Received) -> RecordDict:
    got.load()
    metrics = evaluate(got.bench.model, got.loader(train=False), got.bench.task)
    return RecordDict({METRICS: MetricRecord(metrics)})


@app.evaluate()
def evaluate_adapter(msg: Message, context: Context) -> Message:
    """Evaluate the received adapter on the node's validation split (each virtual client's, for a cohort).

    A message marked ``central`` asks for the server's central evaluation
    instead (``eval.central = worker``): the global adapter on the server's test split, per task.
    """
    if msg.content[CONFIG].get(CENTRAL):
        cfg = from_run_config(context.run_config)
        return Message(content=central.worker_reply(cfg, from_record(msg.content[ARRAYS])), reply_to=msg)
    if protocol.is_cohort(msg.content):
        members, failed = _cohort(msg, from_run_config(context.run_config))
        return Message(content=protocol.reply({**failed, **_each(members, _evaluate)}), reply_to=msg)
    return Message(content=_evaluate(_single(msg, context)), reply_to=msg)


def _secagg_stage(
    msg: Message, context: Context, stage: str, answer: Callable[[RecordDict, RecordDict], RecordDict]
) -> Message:
    """One query stage of secure aggregation, its secrets kept in the node's ``context.state``."""
    rounds.simulate_dropout(from_run_config(context.run_config).secagg, _node_data(context.node_config)[0], stage)
    return Message(content=answer(msg.content, context.state), reply_to=msg)


@app.query(SECAGG_KEYS)
def secagg_keys(msg: Message, context: Context) -> Message:
    """Secure aggregation, stage 1: this round's public keys."""
    return _secagg_stage(msg, context, "keys", rounds.answer_keys)


@app.query(SECAGG_SHARES)
def secagg_shares(msg: Message, context: Context) -> Message:
    """Secure aggregation, stage 2: encrypted shares of this client's secrets for its neighbours."""
    return _secagg_stage(msg, context, "shares", rounds.answer_shares)


@app.train(SECAGG_TRAIN)
def secagg_train(msg: Message, context: Context) -> Message:
    """Secure aggregation, stage 3: one round of local training; the reply carries the masked update only."""
    started = time.monotonic()
    got = _single(msg, context)
    rounds.simulate_dropout(got.cfg.secagg, _node_data(context.node_config)[0], "train")
    content = train_alone(got, started)
    masked = rounds.masked_reply(
        msg.content, content, got.sent, from_record(content[ARRAYS]), context.state, got.cfg.secagg, got.cfg.dp
    )
    return Message(content=masked, reply_to=msg)


@app.query(SECAGG_UNMASK)
def secagg_unmask(msg: Message, context: Context) -> Message:
    """Secure aggregation, stage 4: the shares the server needs to remove the masks."""
    return _secagg_stage(msg, context, "unmask", rounds.answer_unmask)
