"""Where the central evaluation runs: the demo's peak memory and the evaluation's share of round time.

``python -m simulations.bench_central --out /tmp/bench-central`` runs the demo (``simulations/demo.sh``'s
settings: SmolLM2-135M-Instruct, chatterbot, 4 virtual clients, 3 rounds, every other key at its default)
twice through ``flwr run``, once per ``eval.central``:

* ``server``: the ServerApp keeps a base model of its own and evaluates on it (fedlora before ``eval.central``);
* ``worker``: a worker node evaluates with the base it holds for training; the ServerApp holds none.

For each it samples the simulation's process tree every 0.5 s (:class:`simulations.bench_scale.ProcessMonitor`:
RSS and PSS summed over the processes, and the peak RSS of each kind of process) and reads ``metrics.json``:
``server-eval-s`` against ``round-time-s`` of the rounds that trained. Both runs hold the machine lock
exclusively, so no other fedlora simulation competes for the CPU. It prints a Markdown table and writes
``results.json`` under ``--out``; docs/performance.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from simulations.bench_scale import ProcessMonitor, machine
from simulations.run import ROOT, flwr_command, local_superlink, machine_lock, run_config_arg

CLIENTS = 4  # demo.sh: simulations.run's default


def demo_run(where: str, out: Path) -> dict[str, Any]:
    """The demo with ``eval.central = where``: peak memory, wall time and the central evaluation's share."""
    flwr_home, output = out / where / "flwr", out / where / "out"
    cmd = flwr_command(run_config_arg({"eval.central": where, "output-dir": str(output)}), CLIENTS)
    with machine_lock(exclusive=True), local_superlink(flwr_home) as env:
        monitor = ProcessMonitor(flwr_home, memory=True, interval=0.5)
        monitor.start()
        started = time.monotonic()
        try:
            result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
        finally:
            memory, _ = monitor.stop()
        wall = time.monotonic() - started
    (out / f"{where}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"the demo with eval.central={where} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    rounds = json.loads((output / "metrics.json").read_text())["rounds"]
    trained = [r for r in rounds if r["round"] > 0]
    return {
        "eval.central": where,
        "wall-s": round(wall, 1),
        "peak-rss-mb": memory["rss-mb"],
        "peak-pss-mb": memory["pss-mb"],
        "peak-rss-mb-by-process": monitor.peak_rss_by_kind,
        "round-time-s": [r["round-time-s"] for r in trained],
        "server-eval-s": [r["server-eval-s"] for r in trained],
        "round-0-eval-s": rounds[0]["server-eval-s"],
        "eval-share": round(sum(r["server-eval-s"] for r in trained) / sum(r["round-time-s"] for r in trained), 3),
        "final-eval": rounds[-1]["server-eval"],
    }


def markdown(runs: list[dict[str, Any]]) -> list[str]:
    """One row per run."""
    lines = [
        "| eval.central | peak RSS MB (sum) | peak PSS MB (sum) | ServerApp process peak RSS MB | worker peak RSS MB "
        "| central eval s, rounds 1-3 | round time s, rounds 1-3 | eval share | whole run s |",
        "|" + " --- |" * 9,
    ]
    for run in runs:
        kinds = run["peak-rss-mb-by-process"]
        server = next((mb for kind, mb in kinds.items() if kind.startswith("flwr-simulation")), 0.0)
        worker = next((mb for kind, mb in kinds.items() if kind.startswith("ray worker")), 0.0)
        lines.append(
            f"| `{run['eval.central']}` | {run['peak-rss-mb']:.0f} | {run['peak-pss-mb']:.0f} | {server:.0f} "
            f"| {worker:.0f} | {', '.join(f'{s:.1f}' for s in run['server-eval-s'])} "
            f"| {', '.join(f'{s:.1f}' for s in run['round-time-s'])} | {run['eval-share']:.0%} | {run['wall-s']:.0f} |"
        )
    return lines


def main() -> None:
    """Command line: where to write, and which placements to run (both by default)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="scratch folder for the runs and results.json")
    parser.add_argument("--placements", default="server,worker", help="eval.central values to run, in order")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [demo_run(where, args.out) for where in args.placements.split(",")]
    (args.out / "results.json").write_text(json.dumps({"machine": machine(), "runs": runs}, indent=2) + "\n")
    print("\n".join(markdown(runs)))


if __name__ == "__main__":
    main()
