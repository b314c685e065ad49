"""ServerApp: build the strategy and the initial adapter, run the rounds, evaluate centrally, save.

Per round it writes ``<output-dir>/metrics.json`` (train loss, client and
central evaluation, bytes up and down); at the end it saves the global adapter
as a peft folder ``<output-dir>/adapter`` for ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result

from fedlora import runtime
from fedlora.adapter import adapter_state, load_adapter_state
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


def run_server(grid: Grid, cfg: RunConfig) -> Result:
    """Run ``num-server-rounds`` rounds of federated adapter training; returns Flower's ``Result``."""
    strategy = build_strategy(cfg)  # fails on a bad strategy name before anything loads
    output_dir = Path(cfg.run.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    bench = runtime.workbench(cfg)
    test_loader = bench.loader(runtime.test_set(cfg), cfg.eval.batch_size)
    report = RoundReport(output_dir / "metrics.json", cfg.run.num_server_rounds)

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        load_adapter_state(bench.model, from_record(arrays))
        metrics = evaluate(bench.model, test_loader, bench.task)
        report.add(server_round, {**strategy.round_log.get(server_round, {}), "server-eval": metrics})
        return MetricRecord(metrics)

    result = strategy.start(
        grid=grid,
        initial_arrays=to_record(adapter_state(bench.model), cfg.wire.dtype),
        num_rounds=cfg.run.num_server_rounds,
        evaluate_fn=central_evaluate,
    )
    load_adapter_state(bench.model, from_record(result.arrays))
    save_adapter(bench.model, output_dir / "adapter")
    log(INFO, "Global adapter saved to %s (load it with peft.PeftModel.from_pretrained)", output_dir / "adapter")
    log(INFO, "Per-round metrics in %s", output_dir / "metrics.json")
    return result
