"""ServerApp: build the strategy and the initial adapter, run the rounds, evaluate centrally, save.

Per round it writes ``<output-dir>/metrics.json`` (train loss, client and
central evaluation, bytes up and down) and ``<output-dir>/checkpoint/``; at the
end it saves the global adapter as a peft folder ``<output-dir>/adapter`` for
``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import random
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedlora import runtime
from fedlora.adapter import adapter_state, load_adapter_state
from fedlora.checkpoint import Checkpoint, load_checkpoint, restore_rng, save_checkpoint
from fedlora.config import RunConfig, from_run_config
from fedlora.report import RoundReport, save_adapter
from fedlora.training import evaluate
from fedlora.wire import from_record, to_record
from strategies import build_strategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point Flower calls with the run's config."""
    run_server(grid, from_run_config(context.run_config))


def run_server(grid: Grid, cfg: RunConfig) -> ArrayRecord:
    """Run ``num-server-rounds`` rounds of federated adapter training; returns the final global adapter.

    After every round the server checkpoints (:mod:`fedlora.checkpoint`); with
    ``resume = true`` it continues from the last checkpointed round.
    """
    strategy = build_strategy(cfg)  # fails on a bad strategy name before anything loads
    output_dir = Path(cfg.run.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_dir = output_dir / "checkpoint"
    resumed = load_checkpoint(checkpoint_dir) if cfg.run.resume else None
    if cfg.run.resume and resumed is None:
        log(WARNING, "resume: no checkpoint in %s; starting from round 1", checkpoint_dir)
    done = resumed.server_round if resumed else 0
    bench = runtime.workbench(cfg)
    test_loader = bench.loader(runtime.test_set(cfg), cfg.eval.batch_size)
    report = RoundReport(output_dir / "metrics.json", cfg.run.num_server_rounds, resumed.metrics if resumed else None)
    latest = resumed.arrays if resumed else to_record(adapter_state(bench.model), cfg.wire.dtype)
    if resumed:
        log(INFO, "resume: continuing after round %d from %s", done, checkpoint_dir)
        strategy.round_offset = done
        strategy.round_log.update(resumed.round_log)
        restore_rng(resumed)

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        nonlocal latest
        server_round += done
        latest = arrays
        load_adapter_state(bench.model, from_record(arrays))
        metrics = evaluate(bench.model, test_loader, bench.task)
        if not (resumed and server_round == done):  # that round was recorded before the interruption
            report.add(server_round, {**strategy.round_log.get(server_round, {}), "server-eval": metrics})
            save_checkpoint(
                checkpoint_dir,
                Checkpoint(server_round, arrays, dict(strategy.round_log), report.rounds, random.getstate()),
            )
        return MetricRecord(metrics)

    strategy.start(
        grid=grid,
        initial_arrays=latest,
        num_rounds=cfg.run.num_server_rounds - done,
        evaluate_fn=central_evaluate,
    )
    load_adapter_state(bench.model, from_record(latest))
    save_adapter(bench.model, output_dir / "adapter")
    log(INFO, "Global adapter saved to %s (load it with peft.PeftModel.from_pretrained)", output_dir / "adapter")
    log(INFO, "Per-round metrics in %s", output_dir / "metrics.json")
    return latest
