"""ServerApp: build the strategy and the initial adapter, run the rounds, evaluate centrally, save.

Per round it writes ``<output-dir>/metrics.json`` (train loss, client and
central evaluation, bytes up and down) and ``<output-dir>/checkpoint/``; at the
end it saves the global adapter as a peft folder ``<output-dir>/adapter`` for
``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterable
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from peft import PeftModel

import fedlora.quiet  # noqa: F401  # installs the third-party warning filters before fedlora loads
from fedlora import central, runtime
from fedlora.adapter import drop_base_weights, load_adapter_state
from fedlora.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_resumable,
    fingerprint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from fedlora.config import RunConfig, default_run_config, from_run_config, task_names
from fedlora.keys import ARRAYS, CENTRAL, CONFIG, NUM_EXAMPLES, SERVER_ROUND
from fedlora.report import RoundReport, save_adapter
from fedlora.wire import from_record, to_record
from strategies import build_strategy

app = ServerApp()


class ProgressGrid:
    """A Flower ``Grid`` that counts each round's clients and logs progress while a round waits for them.

    Flower's ``send_and_receive`` blocks silently until every sampled client has
    replied; with many clients or long local training a round can take minutes.
    This wrapper does the same push-then-pull loop (same poll interval as the
    wrapped grid), logs "k/n clients done" every ``interval`` seconds, and keeps
    per-round counts of messages sent and good replies for the round report.
    Everything else is delegated to the wrapped grid.
    """

    def __init__(self, grid: Grid, interval: float = 30.0) -> None:
        self.grid = grid
        self.interval = interval
        self.counts: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def take_counts(self) -> dict[str, int]:
        """Messages sent (``<type>-sampled``) and good replies (``<type>-replies``) since the last call."""
        counts, self.counts = dict(self.counts), Counter()
        return counts

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Push ``messages``, then pull replies until all are in or ``timeout`` seconds have passed."""
        messages = list(messages)
        if not messages:  # e.g. no client evaluation (fraction-evaluate=0): nothing to count or wait for
            return []
        # counted by category: ``train.secagg`` (secure aggregation) is training, its stages are queries
        kind = messages[0].metadata.message_type.split(".")[0]
        pending = set(self.grid.push_messages(messages))
        sent = len(pending)
        self.counts[f"{kind}-sampled"] += sent
        started = last_log = time.monotonic()
        poll = float(getattr(self.grid, "pull_interval", 3.0))  # Flower's HTTP grid polls every 3 s
        replies: list[Message] = []
        while pending:
            new = list(self.grid.pull_messages(pending))
            replies += new
            pending.difference_update(m.metadata.reply_to_message_id for m in new)
            self.counts[f"{kind}-replies"] += sum(not m.has_error() for m in new)
            now = time.monotonic()
            if not pending or (timeout is not None and now - started >= timeout):
                break
            if now - last_log >= self.interval:
                log(INFO, "%s: %d/%d clients done, %.0fs", kind, sent - len(pending), sent, now - started)
                last_log = now
            time.sleep(poll)
        return replies


# Always in the configuration line: what a reader needs to tell two runs' logs apart.
HEADLINE_KEYS = ("model.name", "data.source", "adapter.method", "adapter.r", "strategy.name", "num-server-rounds")


def configuration_line(run_config: dict[str, Any]) -> str:
    """The run's configuration in one line: the headline keys and every key set away from its default."""
    defaults = default_run_config()
    shown = [
        f"{key}={value!r}"
        for key, value in sorted(run_config.items())
        if key in HEADLINE_KEYS or defaults.get(key) != value
    ]
    return f"Run configuration: {' '.join(shown)} (every other key at its default, see docs/configuration.md)"


def summary_table(rounds: list[dict[str, Any]]) -> list[str]:
    """The end-of-run table: one Markdown row per round of ``metrics.json``'s entries."""
    metrics = sorted({k for r in rounds for k in r.get("server-eval", {}) if k != NUM_EXAMPLES})
    header = ["round", "clients", "time s", "train loss", *metrics, "MB up", "MB down"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rounds:
        clients = r.get("clients", {})
        cells = [
            str(r["round"]),
            f"{clients['train-replies']}/{clients['train-sampled']}" if "train-sampled" in clients else "",
            f"{r.get('round-time-s', 0):.1f}",
            f"{r['train']['train-loss']:.4f}" if "train-loss" in r.get("train", {}) else "",
            *(f"{r['server-eval'][m]:.4f}" if m in r.get("server-eval", {}) else "" for m in metrics),
            f"{r.get('bytes-up', 0) / 1e6:.2f}",
            f"{r.get('bytes-down', 0) / 1e6:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def ask_worker(grid: Grid, arrays: ArrayRecord, server_round: int) -> RecordDict:
    """The central evaluation of ``arrays`` by one node (``eval.central = worker``): its reply's content.

    Nodes are asked in order of their id until one answers; the request does
    not go through :class:`ProgressGrid`, so it is not counted as a client's.
    """
    errors = []
    for node in sorted(grid.get_node_ids()):
        content = RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord({SERVER_ROUND: server_round, CENTRAL: True})})
        request = Message(content=content, dst_node_id=node, message_type=MessageType.EVALUATE)
        for answer in grid.send_and_receive([request]):
            if not answer.has_error():
                return answer.content
            errors.append(f"node {node}: {answer.error.reason}")
    raise RuntimeError(f"no node could run the central evaluation (eval.central=worker): {'; '.join(errors)}")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point Flower calls with the run's config."""
    cfg = from_run_config(context.run_config)  # a bad key fails here, before it is logged
    log(INFO, "%s", configuration_line(dict(context.run_config)))
    run_server(grid, cfg)


def run_server(grid: Grid, cfg: RunConfig) -> ArrayRecord:
    """Run ``num-server-rounds`` rounds of federated adapter training; returns the final global adapter.

    After every round the server checkpoints (:mod:`fedlora.checkpoint`); with
    ``resume = true`` it continues from the last checkpointed round, and refuses
    (:class:`~fedlora.checkpoint.CheckpointError`) when there is none or it does
    not fit this run.
    """
    strategy = build_strategy(cfg)  # fails on a bad strategy name before anything loads
    central.check_metric(cfg)
    if cfg.cohort.clients:
        runtime.check_cohort_data(cfg)
    on_worker = central.placement(cfg, grid) == central.WORKER
    progress = ProgressGrid(grid)  # counts clients, logs progress within a round
    output_dir = Path(cfg.run.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_dir = output_dir / "checkpoint"
    resumed = load_checkpoint(checkpoint_dir) if cfg.run.resume else None
    if cfg.run.resume and resumed is None:
        raise CheckpointError(f"resume=true but there is no checkpoint in {checkpoint_dir}")
    done = resumed.server_round if resumed else 0
    # On a worker, the ServerApp's base is only needed now: the initial adapter is drawn from the seed on it.
    bench = runtime.workbench(cfg, reuse=False if on_worker else None)
    if resumed:
        check_resumable(resumed, cfg, bench.initial)
    tasks = task_names(cfg)
    report = RoundReport(output_dir / "metrics.json", cfg.run.num_server_rounds, resumed.metrics if resumed else None)
    # The adapter as built, not the cached model's current one (an earlier run in this process may have changed it).
    latest = resumed.arrays if resumed else to_record(bench.initial, cfg.wire.dtype)
    if resumed:
        log(INFO, "resume: continuing after round %d from %s", done, checkpoint_dir)
        strategy.round_offset = done
        strategy.round_log.update(resumed.round_log)
        restore_rng(resumed)
    if on_worker:
        drop_base_weights(bench.model)  # what remains loads and saves adapters
        central.release_memory()
        log(INFO, "central evaluation on a worker (eval.central): the ServerApp holds no base model")

    def central_metrics(server_round: int, arrays: ArrayRecord) -> dict[str, dict]:
        if on_worker:
            return central.read_worker_reply(cfg, ask_worker(grid, arrays, server_round))
        return central.evaluate_tasks(bench, cfg, from_record(arrays))

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        nonlocal latest
        server_round += done
        latest = arrays
        entry: dict[str, Any] = {}
        if server_round % cfg.run.evaluate_every == 0 or server_round == cfg.run.num_server_rounds:
            started = time.monotonic()
            per_task = central_metrics(server_round, arrays)
            entry["server-eval"] = per_task[""] if "" in per_task else central.mean_over_tasks(per_task)
            entry["server-eval-s"] = round(time.monotonic() - started, 3)  # its share of round-time-s
            if tasks:
                entry["server-eval-per-task"] = per_task
        if not (resumed and server_round == done):  # that round was recorded before the interruption
            clients = progress.take_counts()
            entry = {**strategy.round_log.get(server_round, {}), **entry}
            report.add(server_round, {**entry, "clients": clients} if clients else entry)
            save_checkpoint(
                checkpoint_dir,
                Checkpoint(
                    server_round, arrays, dict(strategy.round_log), report.rounds, random.getstate(), fingerprint(cfg)
                ),
            )
        return MetricRecord(entry["server-eval"]) if "server-eval" in entry else None

    strategy.start(
        grid=progress,  # type: ignore[arg-type]  # a Grid by delegation
        initial_arrays=latest,
        num_rounds=cfg.run.num_server_rounds - done,
        timeout=cfg.run.round_timeout,
        evaluate_fn=central_evaluate,
    )
    load_adapter_state(bench.model, from_record(latest))
    save_adapter(bench.model, output_dir / "adapter", method=bench.method)
    loader = "peft.PeftModel" if isinstance(bench.model, PeftModel) else "transformers' AutoModelForCausalLM"  # LISA
    log(INFO, "Global adapter saved to %s (load it with %s.from_pretrained)", output_dir / "adapter", loader)
    for task in tasks:  # a method with per-task adapters (MTLoRA): each task's, in peft's multi-adapter layout
        adapters = bench.method.task_adapters(task)
        if adapters:
            save_adapter(bench.model, output_dir / f"adapter-{task}", adapters)
            log(INFO, "Task '%s': adapters %s saved to %s", task, ", ".join(adapters), output_dir / f"adapter-{task}")
    for line in ["Summary:", *summary_table(report.rounds)]:
        log(INFO, "%s", line)
    log(INFO, "Per-round metrics in %s", output_dir / "metrics.json")
    return latest
