"""What a worker process keeps between messages: one base model with its adapter, and a little data.

In simulation, Flower runs the virtual clients of a worker one after another in
one long-lived Ray actor. The promise is "many virtual clients on one machine":
a round should cost the training it contains, not model loading, and memory
should not grow with the number of clients. So a worker keeps:

* **one base model**, loaded once and wrapped with the run's adapter
  (:func:`workbench`). A client's identity lives only in the adapter state it
  receives, which :func:`fedlora.adapter.load_adapter_state` overwrites whole
  (missing or extra keys are an error) before every use, and the optimizer is
  built afresh per message, so the cached model never carries one client's
  state into another's. A new configuration replaces the cached model rather
  than adding a second one. ``reuse-base = false`` turns the cache off and
  reloads the base for every call, as FlowerTune's ``client_fn`` does: the
  baseline of ``simulations/bench_scale.py``.
* **recent clients' tokenised data**, in an LRU of :data:`CLIENT_SETS_CACHED`
  clients. A federation of up to that many clients is tokenised once (a
  smaller LRU thrashes when every client trains every round); beyond it, the
  cache holds at most that share of the partitions, so it never holds more
  than about one tokenised copy of the data source, whatever the number of
  virtual clients.
* **the partitioner** of the run's split, computed once per worker instead of
  once per client call (each call would otherwise partition the whole pool again).

State that must outlive a client's turn (optimizer moments, personal tensors)
goes to the per-client store on disk (:mod:`fedlora.store`), never into this
process.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from datasets import Dataset
from flwr.common.logger import log
from flwr_datasets.partitioner import Partitioner
from peft import PeftModel
from torch import Tensor
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from fedlora.adapter import adapter_state, build_adapter_model
from fedlora.config import ConfigError, RunConfig, for_task, task_names
from fedlora.data.federated import local_split, make_partitioner, partition_split, server_and_pool
from fedlora.data.sources import load_local
from fedlora.data.tokenize import collator, tokenize
from fedlora.methods import get_method
from fedlora.methods.base import AdapterMethod
from fedlora.models import CLASSIFICATION, REWARD, load_tokenizer, model_dir, remote_code, resolve_task
from fedlora.store import ClientStore, client_key, optimizer_tensors, restore_optimizer
from fedlora.training import make_loader

# Progress bars from every worker would drown the per-round log.
datasets.disable_progress_bars()
transformers.utils.logging.disable_progress_bar()

CLIENT_SETS_CACHED = 64
"""Clients whose tokenised (train, validation) sets a worker keeps (least recently used dropped first)."""

stats: dict[str, int] = {"base-loads": 0, "client-set-builds": 0}
"""Counters of this process's expensive work: how often a base model was loaded and a client's data tokenised."""


class _Lru:
    """A mapping that keeps at most ``size`` entries, dropping the least recently used."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: OrderedDict[tuple[Any, ...], Any] = OrderedDict()

    def get(self, key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        value = build()
        self.entries[key] = value
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self.entries.clear()


_MODEL = _Lru(1)  # one base per process: a new configuration replaces the old model
_SPLIT = _Lru(2)  # (test, pool) of the data source
_PARTITIONER = _Lru(2)
_TOKENIZER = _Lru(2)
_TEST = _Lru(2)
_CLIENT_SETS = _Lru(CLIENT_SETS_CACHED)


def clear_caches() -> None:
    """Forget everything this process cached (what a worker restart does)."""
    for cache in (_MODEL, _SPLIT, _PARTITIONER, _TOKENIZER, _TEST, _CLIENT_SETS):
        cache.clear()


@dataclass
class Workbench:
    """A base model wrapped with the run's adapter, and how to feed it."""

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    task: str
    method: AdapterMethod
    initial: dict[str, Tensor]  # the adapter as built: where a client's local tensors start (fedlora.adapter)

    def loader(self, dataset: Dataset, batch_size: int, seed: int | None = None) -> DataLoader:
        """Padded batches of a tokenised ``dataset`` (shuffled when ``seed`` is given)."""
        return make_loader(dataset, collator(self.tokenizer, self.task), batch_size, seed)


def _task_and_labels(cfg: RunConfig) -> tuple[str, int]:
    task = resolve_task(cfg.model.name, cfg.model.task)
    if task == REWARD:
        return task, 1  # one output: the reward
    return task, (_split(cfg)[1].features["label"].num_classes if task == CLASSIFICATION else 0)


def _build_workbench(cfg: RunConfig, task: str, num_labels: int) -> Workbench:
    method = get_method(cfg.adapter.method)
    path = model_dir(cfg.model.name, cfg.model.cache_dir)
    torch.manual_seed(cfg.run.seed)  # same head, adapter and shared frozen parts on every party
    with remote_code(cfg.model.trust_remote_code):
        tokenizer = load_tokenizer(path, cfg.model.chat_template)
        base = method.load_base(path, task, num_labels, cfg)
    stats["base-loads"] += 1
    model = build_adapter_model(base, cfg, task)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return Workbench(model, tokenizer, task, method, adapter_state(model))


def model_key(cfg: RunConfig, task: str, num_labels: int) -> tuple[Any, ...]:
    """What decides the cached model: the base, the adapter and the method's own settings, seed and schedule.

    The chosen method's section is part of it (``cfg.method_settings``, whatever
    the method; another method's is at its defaults and ``adapter.method`` is in
    the key), so a method's new setting can never be forgotten here; a setting that
    only steers training (``loraplus.lr-ratio``) merely makes the key finer than it
    needs to be, and one configuration serves a whole run.
    """
    schedule = (cfg.run.num_server_rounds, cfg.train.local_steps)  # AdaLoRA's budget schedule
    return (
        cfg.model,
        cfg.adapter,
        cfg.method_settings,
        task,
        num_labels,
        cfg.run.seed,
        schedule,
        cfg.train.gradient_checkpointing,
        cfg.train.max_length,  # LongLoRA's default attention group is a quarter of it
    )


def workbench(cfg: RunConfig, reuse: bool | None = None) -> Workbench:
    """The process-wide model for ``cfg`` (built on first use; the adapter starts from ``run.seed``).

    With ``run.reuse-base = false`` (or ``reuse=False``) every call loads a
    fresh base and nothing is cached: the FlowerTune pattern, for comparison.
    """
    task, num_labels = _task_and_labels(cfg)
    if not (cfg.run.reuse_base if reuse is None else reuse):
        _MODEL.clear()  # never hold two bases at once
        return _build_workbench(cfg, task, num_labels)
    key = model_key(cfg, task, num_labels)
    if key not in _MODEL.entries:
        _MODEL.clear()  # free the old base before loading the new one
    return _MODEL.get(key, lambda: _build_workbench(cfg, task, num_labels))


def _split(cfg: RunConfig) -> tuple[Dataset, Dataset]:
    task = resolve_task(cfg.model.name, cfg.model.task)  # which columns of your own data set to keep
    return _SPLIT.get((cfg.data, cfg.run.seed, task), lambda: server_and_pool(cfg.data, cfg.run.seed, task))


def check_cohort_data(cfg: RunConfig) -> None:
    """Every virtual client of ``cohort.clients`` can get at least 2 examples (train and validation).

    Raises :class:`ConfigError` naming ``cohort.clients`` otherwise (a
    partitioner would fail later, for some client, with a less clear error).
    """
    for task in task_names(cfg) or [""]:
        pool = len(_split(for_task(cfg, task) if task else cfg)[1])
        clients = (
            len(range(task_names(cfg).index(task), cfg.cohort.clients, len(task_names(cfg))))
            if task
            else cfg.cohort.clients
        )
        if 2 * clients > pool:
            source = task or cfg.data.source
            raise ConfigError(
                f"cohort.clients={cfg.cohort.clients} gives {clients} clients of data source '{source}', which has "
                f"{pool} examples to share: at most {pool // 2} clients (2 examples each)"
            )


def _tokenizer(cfg: RunConfig) -> PreTrainedTokenizerBase:
    def build() -> PreTrainedTokenizerBase:
        with remote_code(cfg.model.trust_remote_code):
            return load_tokenizer(model_dir(cfg.model.name, cfg.model.cache_dir), cfg.model.chat_template)

    return _TOKENIZER.get((cfg.model,), build)


def _tokenized(cfg: RunConfig, dataset: Dataset) -> Dataset:
    task = resolve_task(cfg.model.name, cfg.model.task)
    return tokenize(dataset, _tokenizer(cfg), task, cfg.train.max_length)


def _by_length(dataset: Dataset) -> Dataset:
    """``dataset`` ordered by token count, so each batch pads to little more than its own examples' length."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    return dataset.select(sorted(range(len(dataset)), key=lengths.__getitem__))


def test_examples(cfg: RunConfig) -> Dataset:
    """The server's held-out test split as rows of the data source (what :func:`test_set` tokenises)."""
    return _split(cfg)[0]


def test_set(cfg: RunConfig) -> Dataset:
    """The server's held-out test split, tokenised and sorted by length (its metrics do not depend on the order)."""
    key = (cfg.data, cfg.run.seed, cfg.model, cfg.train.max_length)
    return _TEST.get(key, lambda: _by_length(_tokenized(cfg, test_examples(cfg))))


def _partitioner(cfg: RunConfig, num_partitions: int) -> Partitioner:
    pool = _split(cfg)[1]
    key = (cfg.data, cfg.run.seed, num_partitions, resolve_task(cfg.model.name, cfg.model.task))  # reward: pairs
    return _PARTITIONER.get(key, lambda: make_partitioner(cfg.data, num_partitions, pool, cfg.run.seed))


def client_sets(cfg: RunConfig, partition_id: int, num_partitions: int, data_path: str = "") -> tuple[Dataset, Dataset]:
    """A client's tokenised (train, validation) sets.

    Partition ``partition_id`` of the configured source, or, with ``data_path``,
    the node's own file (:func:`fedlora.data.sources.load_local`). Cached for
    the :data:`CLIENT_SETS_CACHED` most recent clients (none with
    ``run.reuse-base = false``, which re-tokenises on every call as FlowerTune does).
    """

    def build() -> tuple[Dataset, Dataset]:
        stats["client-set-builds"] += 1
        if data_path:
            task = resolve_task(cfg.model.name, cfg.model.task)
            train, val = local_split(load_local(data_path, task, cfg.data), cfg.data.val_fraction, cfg.run.seed)
        else:
            train, val = partition_split(cfg.data, _partitioner(cfg, num_partitions), partition_id, cfg.run.seed)
        return _tokenized(cfg, train), _tokenized(cfg, val)

    if not cfg.run.reuse_base:
        return build()
    key = (cfg.data, cfg.run.seed, cfg.model, cfg.train.max_length, partition_id, num_partitions, data_path)
    return _CLIENT_SETS.get(key, build)


def client_store(cfg: RunConfig, namespace: str) -> ClientStore:
    """The per-client store: ``run.store-dir``, else ``$FEDLORA_STORE``, else ``<output-dir>/client-store``."""
    root = cfg.run.store_dir or os.environ.get("FEDLORA_STORE") or str(Path(cfg.run.output_dir) / "client-store")
    return ClientStore(root, namespace)


def restore_optimizer_state(
    cfg: RunConfig,
    node_config: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module,
    server_round: int,
) -> bool:
    """With ``train.keep-optimizer-state``, load this client's optimizer state from its last round.

    State saved in round ``server_round`` or later cannot come from an earlier
    round of this run (it is left over from another run in the same store), so
    it is ignored. Returns whether state was restored.
    """
    if not cfg.train.keep_optimizer_state:
        return False
    found = client_store(cfg, "optimizer").load_with_metadata(client_key(node_config))
    if found is None:
        return False
    tensors, metadata = found
    if int(metadata.get("round", server_round)) >= server_round:
        log(INFO, "optimizer state of %s is from round %s, not before %d: ignored", client_key(node_config),
            metadata.get("round"), server_round)  # fmt: skip
        return False
    restored = restore_optimizer(optimizer, model, tensors)
    log(INFO, "optimizer state of %s restored from round %s (%d parameters)", client_key(node_config),
        metadata.get("round"), restored)  # fmt: skip
    return restored > 0


def keep_optimizer_state(
    cfg: RunConfig,
    node_config: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module,
    server_round: int,
) -> None:
    """With ``train.keep-optimizer-state``, save this client's optimizer state after round ``server_round``."""
    if cfg.train.keep_optimizer_state:
        client_store(cfg, "optimizer").save(
            client_key(node_config), optimizer_tensors(optimizer, model), {"round": str(server_round)}
        )


def load_local_tensors(
    cfg: RunConfig, node_config: Mapping[str, Any], server_round: int, message_type: str
) -> dict[str, Tensor] | None:
    """The client's local tensors (those a strategy never sends: FedSA's B, personal adapters), if it has any.

    They were saved after a training round; a training message of round t takes
    them from a round before t, an evaluation message of round t from t or
    before. Newer ones are left over from another run in the same store: ignored.
    """
    found = client_store(cfg, "local").load_with_metadata(client_key(node_config))
    if found is None:
        return None
    tensors, metadata = found
    saved = int(metadata.get("round", 0))
    return tensors if saved < server_round or (message_type != "train" and saved == server_round) else None


def save_local_tensors(
    cfg: RunConfig, node_config: Mapping[str, Any], server_round: int, tensors: Mapping[str, Tensor]
) -> None:
    """Keep the client's local tensors after training round ``server_round``, on disk (:mod:`fedlora.store`)."""
    client_store(cfg, "local").save(client_key(node_config), tensors, {"round": str(server_round)})
