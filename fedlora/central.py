"""Central evaluation: the global adapter on the server's held-out test split, per task.

Where it runs is ``eval.central`` (:func:`placement`). On the server, the
ServerApp keeps a base model of its own for the whole run. On a worker, one
node evaluates with the base it already holds for training (an ``evaluate``
message marked :data:`~fedlora.keys.CENTRAL`, answered by :func:`worker_reply`):
in a simulation, whose workers run on the same machine as the ServerApp, that
is one base model fewer, and the ServerApp keeps only the adapter's structure
(:func:`fedlora.adapter.drop_base_weights`) to write the final adapter.
Both compute the same numbers, with :func:`evaluate_tasks`: loss and
perplexity or accuracy, and with ``eval.metric = exact-match`` a task metric
on generated answers (:mod:`fedlora.task_metrics`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

import torch
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.superlink.grid.inmemory_grid import InMemoryGrid
from torch import Tensor

from fedlora import runtime
from fedlora.adapter import load_adapter_state
from fedlora.config import ConfigError, RunConfig, for_task, task_names
from fedlora.keys import NUM_EXAMPLES, task_metrics, task_state
from fedlora.models import CAUSAL_LM, resolve_task
from fedlora.task_metrics import greedy_exact_match
from fedlora.training import evaluate

SERVER, WORKER = "server", "worker"
EXACT_MATCH = "exact-match"


def placement(cfg: RunConfig, grid: Grid) -> str:
    """Where this run's central evaluation runs: ``eval.central``, with ``auto`` a worker in simulation only.

    A simulation's ServerApp gets Flower's in-memory grid; a deployed one talks
    to its SuperLink over the network, and its nodes are other parties' machines.
    """
    if cfg.eval.central != "auto":
        return cfg.eval.central
    return WORKER if isinstance(grid, InMemoryGrid) else SERVER


def evaluate_tasks(bench: runtime.Workbench, cfg: RunConfig, state: dict[str, Tensor]) -> dict[str, dict]:
    """``state`` evaluated on the test split of each task: the shared adapter with that task's ("" without tasks).

    Under ``torch.inference_mode``, cheaper than ``no_grad``: nothing this
    makes is needed by autograd later. The model is left with every adapter active.
    """
    per_task = {}
    for task in task_names(cfg) or [""]:
        task_cfg = for_task(cfg, task) if task else cfg
        loader = bench.loader(runtime.test_set(task_cfg), cfg.eval.batch_size)
        bench.method.activate(bench.model, task)
        load_adapter_state(bench.model, task_state(state, task) if task else state)
        with torch.inference_mode():
            per_task[task] = evaluate(bench.model, loader, bench.task)
        if cfg.eval.metric == EXACT_MATCH:
            rows = runtime.test_examples(task_cfg)
            rows = rows.select(range(min(cfg.eval.generate_examples, len(rows))))
            per_task[task][f"eval-{EXACT_MATCH}"] = greedy_exact_match(
                bench.model, bench.tokenizer, rows, cfg.eval.max_new_tokens, cfg.eval.batch_size
            )
    bench.method.activate(bench.model, "")
    return per_task


def check_metric(cfg: RunConfig) -> None:
    """``eval.metric = exact-match`` needs answers to generate: a causal LM (raises :class:`ConfigError`)."""
    if cfg.eval.metric == EXACT_MATCH and resolve_task(cfg.model.name, cfg.model.task) != CAUSAL_LM:
        raise ConfigError(
            f"eval.metric='{EXACT_MATCH}' generates answers, so it needs a causal LM; model '{cfg.model.name}' is "
            "a classifier here (its accuracy is reported already)"
        )


def mean_over_tasks(per_task: dict[str, dict[str, float]]) -> dict[str, float]:
    """Every metric averaged over the tasks, weighted by their test examples (``num-examples``: the total)."""
    total = sum(m[NUM_EXAMPLES] for m in per_task.values())
    keys = set.intersection(*(set(m) for m in per_task.values())) - {NUM_EXAMPLES}
    mean = {k: sum(m[k] * m[NUM_EXAMPLES] for m in per_task.values()) / total for k in sorted(keys)}
    return {**mean, NUM_EXAMPLES: total}


def worker_reply(cfg: RunConfig, state: dict[str, Tensor]) -> RecordDict:
    """A worker's answer to a central-evaluation request: one MetricRecord per task, on this process's base."""
    per_task = evaluate_tasks(runtime.workbench(cfg), cfg, state)
    return RecordDict({task_metrics(task): MetricRecord(metrics) for task, metrics in per_task.items()})


def read_worker_reply(cfg: RunConfig, content: RecordDict) -> dict[str, dict]:
    """The per-task metrics of a worker's reply (:func:`worker_reply`)."""
    return {task: dict(content[task_metrics(task)]) for task in task_names(cfg) or [""]}


def release_memory() -> None:
    """Collect what is unreachable and hand freed heap pages back to the system (glibc keeps them otherwise)."""
    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc and hasattr(ctypes.CDLL(libc), "malloc_trim"):
        ctypes.CDLL(libc).malloc_trim(0)
