"""What a process keeps between messages: the base model with its adapter, and tokenised data.

In simulation, Flower runs every virtual client of a worker in one long-lived
Ray actor, so a module-level cache loads the base once per worker rather than
once per client per round. A client's identity lives only in the adapter state
it receives, which :func:`fedlora.adapter.load_adapter_state` overwrites whole
before every use, so cached models never carry one client's state into another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import datasets
import torch
import transformers
from datasets import Dataset
from peft import PeftModel
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from fedlora.adapter import build_adapter_model
from fedlora.config import RunConfig
from fedlora.data.federated import client_partition, local_split, server_and_pool
from fedlora.data.sources import load_local
from fedlora.data.tokenize import collator, tokenize
from fedlora.methods import AdapterMethod, get_method
from fedlora.models import CLASSIFICATION, load_tokenizer, model_dir, resolve_task
from fedlora.training import make_loader

# Progress bars from every worker would drown the per-round log.
datasets.disable_progress_bars()
transformers.utils.logging.disable_progress_bar()

_CACHE: dict[tuple[Any, ...], Any] = {}


def _cached(key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


@dataclass
class Workbench:
    """A base model wrapped with the run's adapter, and how to feed it."""

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    task: str
    method: AdapterMethod

    def loader(self, dataset: Dataset, batch_size: int, seed: int | None = None) -> DataLoader:
        """Padded batches of a tokenised ``dataset`` (shuffled when ``seed`` is given)."""
        return make_loader(dataset, collator(self.tokenizer, self.task), batch_size, seed)


def workbench(cfg: RunConfig) -> Workbench:
    """The process-wide model for ``cfg`` (built on first use; the adapter starts from ``run.seed``)."""
    task = resolve_task(cfg.model.name, cfg.model.task)
    num_labels = _split(cfg)[1].features["label"].num_classes if task == CLASSIFICATION else 0

    def build() -> Workbench:
        method = get_method(cfg.adapter.method)
        path = model_dir(cfg.model.name, cfg.model.cache_dir)
        tokenizer = load_tokenizer(path)
        torch.manual_seed(cfg.run.seed)  # same head, adapter and shared frozen parts on every party
        base = method.load_base(path, task, num_labels, cfg)
        return Workbench(build_adapter_model(base, cfg, task), tokenizer, task, method)

    key = ("model", cfg.model, cfg.adapter, cfg.qlora, cfg.prompt, task, num_labels, cfg.run.seed)
    return _cached(key, build)


def _split(cfg: RunConfig) -> tuple[Dataset, Dataset]:
    return _cached(("split", cfg.data, cfg.run.seed), lambda: server_and_pool(cfg.data, cfg.run.seed))


def _tokenized(cfg: RunConfig, dataset: Dataset) -> Dataset:
    bench = workbench(cfg)
    return tokenize(dataset, bench.tokenizer, bench.task, cfg.train.max_length)


def test_set(cfg: RunConfig) -> Dataset:
    """The server's held-out test split, tokenised."""
    return _cached(
        ("test", cfg.data, cfg.run.seed, cfg.model, cfg.train.max_length), lambda: _tokenized(cfg, _split(cfg)[0])
    )


def client_sets(cfg: RunConfig, partition_id: int, num_partitions: int, data_path: str = "") -> tuple[Dataset, Dataset]:
    """A client's tokenised (train, validation) sets.

    Partition ``partition_id`` of the configured source, or, with ``data_path``,
    the node's own file (:func:`fedlora.data.sources.load_local`).
    """

    def build() -> tuple[Dataset, Dataset]:
        if data_path:
            task = resolve_task(cfg.model.name, cfg.model.task)
            train, val = local_split(load_local(data_path, task), cfg.data.val_fraction, cfg.run.seed)
        else:
            train, val = client_partition(cfg.data, _split(cfg)[1], partition_id, num_partitions, cfg.run.seed)
        return _tokenized(cfg, train), _tokenized(cfg, val)

    key = ("client", cfg.data, cfg.run.seed, cfg.model, cfg.train.max_length, partition_id, num_partitions, data_path)
    return _cached(key, build)
