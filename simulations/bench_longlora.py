"""Long-context training on CPU: LongLoRA's S²-Attn against plain LoRA at the same length (issue 17).

Each configuration trains ``--steps`` optimizer steps of one sequence of
``--length`` real tokens (the data source's answers, concatenated) on SmolLM2,
in a fresh process, so that its peak memory is its own:

* ``lora``: plain LoRA (q_proj, v_proj), full causal attention (PyTorch's SDPA);
* ``longlora-lora-only``: the same LoRA under S²-Attn (groups of ``--group-size``),
  no embeddings or norms trained: S²-Attn's effect alone;
* ``longlora``: LongLoRA as configured by default, S²-Attn plus trained
  embeddings and norms (their AdamW state included).

Measured per configuration: the median wall and CPU time (all threads of the
process: less sensitive to a shared machine) of a training step after the first
(forward, backward, optimizer step), and the peak resident memory of the
process while training (sampled every 20 ms) next to its resident memory
before the first step. The timed runs hold the machine lock exclusively
(:func:`simulations.run.machine_lock`). Results: ``docs/longlora.json`` and the
table printed (copied into docs/performance.md).

    .venv/bin/python -m simulations.bench_longlora --length 2048 --steps 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from fedlora import runtime
from fedlora.config import RunConfig, from_run_config
from simulations.run import ROOT, machine_lock

CONFIGS: dict[str, dict[str, Any]] = {
    "lora": {"adapter.method": "lora"},
    "longlora-lora-only": {"adapter.method": "longlora", "longlora.trainable-modules": ""},
    "longlora": {"adapter.method": "longlora"},
}


class PeakRss:
    """The largest resident memory of this process while the context is open, sampled every ``interval`` s."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def long_batch(cfg: RunConfig, length: int) -> dict[str, torch.Tensor]:
    """One sequence of ``length`` real tokens (the test split's examples, concatenated), trained on every token."""
    ids: list[int] = []
    for example in runtime.test_set(cfg).with_format("python"):
        ids += example["input_ids"]
        if len(ids) >= length:
            break
    if len(ids) < length:
        raise ValueError(f"the data source has fewer than {length} tokens in its test split")
    input_ids = torch.tensor([ids[:length]])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def run_one(name: str, length: int, steps: int, group_size: int) -> dict[str, Any]:
    """Train ``steps`` steps of configuration ``name`` in this process; its timings and memory."""
    overrides = {
        **CONFIGS[name],
        "train.max-length": length,
        "adapter.dropout": 0.0,
        **({"longlora.group-size": group_size} if name.startswith("longlora") else {}),
    }
    cfg = from_run_config(overrides)
    bench = runtime.workbench(cfg)
    batch = long_batch(cfg, length)
    optimizer = bench.method.optimizer(bench.model, cfg, 1e-4)
    bench.model.train()
    before = psutil.Process().memory_info().rss
    times, cpu = [], []
    with PeakRss() as peak:
        for _ in range(steps):
            started, started_cpu = time.perf_counter(), time.process_time()
            bench.model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
    trainable = sum(p.numel() for p in bench.model.parameters() if p.requires_grad)
    return {
        "config": name,
        "overrides": overrides,
        "length": length,
        "steps": steps,
        "step-s": [round(t, 3) for t in times],
        "median-step-s": round(statistics.median(times[1:] or times), 3),
        "median-step-cpu-s": round(statistics.median(cpu[1:] or cpu), 3),
        "rss-before-mb": round(before / 2**20),
        "peak-rss-mb": round(peak.peak / 2**20),
        "trainable-params": trainable,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    """Run every configuration in its own process under the exclusive machine lock; write and print the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=2048, help="tokens in the training sequence")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per configuration (the first is warm-up)")
    parser.add_argument("--group-size", type=int, default=512, help="S²-Attn group (the paper: length / 4)")
    parser.add_argument("--only", choices=sorted(CONFIGS), help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "longlora.json")
    args = parser.parse_args()
    if args.only:
        print(json.dumps(run_one(args.only, args.length, args.steps, args.group_size)))
        return
    results = []
    with machine_lock(exclusive=True):
        for name in CONFIGS:
            command = [sys.executable, "-m", "simulations.bench_longlora", "--only", name]
            command += ["--length", str(args.length), "--steps", str(args.steps), "--group-size", str(args.group_size)]
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    header = "| configuration | trainable parameters | median step s (wall) | median step CPU s | RSS before MB"
    print(header + " | peak RSS MB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(
            f"| `{r['config']}` | {r['trainable-params']:,} | {r['median-step-s']} | {r['median-step-cpu-s']} "
            f"| {r['rss-before-mb']:,} | {r['peak-rss-mb']:,} |"
        )


if __name__ == "__main__":
    main()
