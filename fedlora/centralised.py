"""The centralised baseline of a federated run: the same training on the pooled client data, in one process.

The first question about a federated result is how far it is from training on
all the data in one place (FedIT, FlexLoRA, FLoRA and FFA-LoRA all report that
row). :func:`run_centralised` answers it for any run config: the same model,
adapter method, initial adapter (``run.seed``), batch size, optimizer, learning
rate schedule and held-out test set as the federated run, trained on the union
of the clients' training partitions, with as many examples per "round" as the
federation's sampled clients see in a round (clients × ``train.local-steps`` ×
``train.batch-size`` × ``train.grad-accumulation``; with ``train.epochs`` one
pass per epoch over the pooled data). A round here is that much training
followed by the central evaluation, written to ``<output-dir>/metrics.json`` in
the federated run's shape (round 0 is the initial evaluation), so the curves of
both runs compare round by round.

One optimizer lives through the whole run (a single process has no reason to
reset it); its learning rate follows the federated cosine over rounds
(:func:`fedlora.training.round_lr`). What only federation has is ignored: the
strategy, client ranks (``adapter.r`` is trained), cohorts, wire dtype.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from datasets import concatenate_datasets

from fedlora import runtime
from fedlora.adapter import load_adapter_state
from fedlora.config import ConfigError, RunConfig, task_names
from fedlora.keys import NUM_EXAMPLES
from fedlora.methods import get_method
from fedlora.methods.base import AdapterMethod
from fedlora.report import RoundReport, save_adapter
from fedlora.selection import is_selectable
from fedlora.training import evaluate, round_lr, train_steps


def sampled_clients(cfg: RunConfig, clients: int) -> int:
    """How many of ``clients`` a federated round trains: Flower's ``max(int(n · fraction-train), min-train-nodes)``."""
    return min(clients, max(int(clients * cfg.run.fraction_train), cfg.run.min_train_nodes))


def _check(cfg: RunConfig, clients: int) -> None:
    method = get_method(cfg.adapter.method)
    if clients < 1:
        raise ConfigError(f"the centralised baseline needs the federation's number of clients (>= 1), got {clients}")
    if task_names(cfg):
        raise ConfigError("data.tasks: the centralised baseline trains one data source; run it once per task")
    if type(method).step_hook is not AdapterMethod.step_hook:
        raise ConfigError(
            f"adapter.method='{cfg.adapter.method}' changes the adapter on a schedule of one client's "
            "train.local-steps, which has no centralised equivalent"
        )


def run_centralised(cfg: RunConfig, clients: int) -> list[dict[str, Any]]:
    """Train on the pooled partitions of ``clients`` clients for ``num-server-rounds`` rounds; metrics.json's rounds.

    ``clients`` is the federation's size (``cohort.clients`` when set): it
    decides the partitions that are pooled and, with ``fraction-train``, the
    examples per round.
    """
    clients = cfg.cohort.clients or clients
    _check(cfg, clients)
    bench = runtime.workbench(cfg)
    if is_selectable(bench.model):
        raise ConfigError(
            f"adapter.method='{cfg.adapter.method}' trains what the server's strategy chooses each round, which the "
            "centralised baseline has no equivalent of"
        )
    pooled = concatenate_datasets([runtime.client_sets(cfg, i, clients)[0] for i in range(clients)])
    test_loader = bench.loader(runtime.test_set(cfg), cfg.eval.batch_size)
    load_adapter_state(bench.model, bench.initial)  # the process's model may hold an earlier run's adapter
    output_dir = Path(cfg.run.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    rounds = cfg.run.num_server_rounds
    report = RoundReport(output_dir / "metrics.json", rounds)

    def central_eval() -> dict[str, Any]:
        started = time.monotonic()
        with torch.inference_mode():
            metrics = evaluate(bench.model, test_loader, bench.task)
        return {"server-eval": metrics, "server-eval-s": round(time.monotonic() - started, 3)}

    report.add(0, central_eval())
    optimizer = bench.method.optimizer(bench.model, cfg, cfg.train.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # scales every parameter group (LoRA+ has two) alike
        optimizer, lambda done: round_lr(done + 1, rounds, cfg.train.lr, cfg.train.lr_min) / cfg.train.lr
    )
    steps = sampled_clients(cfg, clients) * cfg.train.local_steps
    for server_round in range(1, rounds + 1):
        torch.manual_seed(cfg.run.seed + 7919 * server_round)  # dropout
        loss = train_steps(
            bench.model,
            bench.loader(pooled, cfg.train.batch_size, seed=cfg.run.seed + 7919 * server_round),
            steps,
            optimizer,
            cfg.train.max_grad_norm,
            precision=cfg.train.precision,
            accumulation=cfg.train.grad_accumulation,
            epochs=cfg.train.epochs,
        )
        schedule.step()
        entry: dict[str, Any] = {"train": {"train-loss": loss, NUM_EXAMPLES: len(pooled)}}
        if server_round % cfg.run.evaluate_every == 0 or server_round == rounds:
            entry |= central_eval()
        report.add(server_round, entry)
    save_adapter(bench.model, output_dir / "adapter")
    load_adapter_state(bench.model, bench.initial)  # the cached model goes back as it was built
    return report.rounds
