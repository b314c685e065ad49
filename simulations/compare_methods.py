"""Every adapter method on the same model, data and seed, through `flwr run`.

``python -m simulations.compare_methods`` (about 20 minutes on 2 CPU cores) runs
each method for ``--rounds`` rounds and writes ``docs/method-comparison.md`` and
``docs/method-comparison.json``: trainable parameters, bytes one client sends per
round, central eval perplexity before and after, and wall time; plus the memory
of the 4-bit QLoRA base against the float32 one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedlora import runtime
from fedlora.adapter import adapter_state, split_residual
from fedlora.config import STRATEGY_REQUIRED, from_run_config
from fedlora.methods import METHODS, get_method
from fedlora.models import model_dir
from fedlora.selection import is_selectable
from simulations.results import machine, page_header
from simulations.run import ROOT, run_and_read
from strategies import build_strategy

# Each method at a learning rate in the range its paper recommends (LoRA+ halves LoRA's, as Hayou et al. advise;
# VeRA and the prompt methods train far fewer parameters and want larger steps).
LEARNING_RATES = {
    "loraplus": 2.5e-4,
    "vera": 1e-2,
    "prompt-tuning": 3e-2,
    "p-tuning": 1e-2,
    "prefix-tuning": 1e-2,
    "p-tuning-v2": 1e-2,
    "lisa": 5e-5,  # full-parameter training: the paper's 5e-5 (LoRA's learning rates are about ten times larger)
}


def method_overrides(method: str, args: argparse.Namespace) -> dict:
    """The run config of one method: the defaults, shortened to fit a CPU."""
    lr = LEARNING_RATES.get(method, 5e-4)
    return {
        "adapter.method": method,
        **({"strategy.name": STRATEGY_REQUIRED[method]} if method in STRATEGY_REQUIRED else {}),
        "num-server-rounds": args.rounds,
        "train.local-steps": args.local_steps,
        "train.lr": lr,
        "train.lr-min": lr / 10,
        "data.test-size": args.test_size,
        "fraction-evaluate": 0.0,
        "min-train-nodes": args.clients,
        "output-dir": str(ROOT / "outputs" / "compare" / method),
    }


def base_memory_mb() -> dict[str, float]:
    """Memory of the default base model in float32 and quantised to NF4 (what each worker holds)."""
    cfg = from_run_config({})
    path = model_dir(cfg.model.name)
    return {
        name: round(get_method(name).load_base(path, "causal-lm", 0, cfg).get_memory_footprint() / 2**20, 1)
        for name in ("lora", "qlora")
    }


def main() -> None:
    """Run every method and write the comparison table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--test-size", type=int, default=50)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "method-comparison")
    args = parser.parse_args()

    rows = []
    for method in args.methods.split(","):
        overrides = method_overrides(method, args)
        rounds, wall = run_and_read(overrides, args.clients)
        cfg = from_run_config(overrides)
        state = adapter_state(runtime.workbench(cfg).model)
        if is_selectable(runtime.workbench(cfg).model):  # LISA: what round 1 trains, not all it may train
            strategy = build_strategy(cfg)
            strategy.global_state, strategy.current_round = state, 1
            state = split_residual(strategy.message_state())[0]
        rows.append(
            {
                "method": method,
                "lr": overrides["train.lr"],
                "trainable-params": sum(t.numel() for t in state.values()),
                "bytes-per-client-per-round": rounds[1]["bytes-up"] // args.clients,
                "perplexity-before": rounds[0]["server-eval"]["eval-perplexity"],
                "perplexity-after": rounds[-1]["server-eval"]["eval-perplexity"],
                "wall-s": round(wall, 1),
            }
        )
        print(rows[-1], flush=True)

    memory = base_memory_mb()
    setup = {
        **{k.replace("_", "-"): v for k, v in vars(args).items() if k not in ("methods", "out")},
        "model": "SmolLM2-135M-Instruct",
        "data": "chatterbot (dirichlet 1.0)",
        "adapter.r": 8,
        "machine": machine(),
    }
    args.out.with_suffix(".json").write_text(
        json.dumps({"setup": setup, "methods": rows, "base-memory-mb": memory}, indent=2) + "\n"
    )
    lines = [
        *page_header("Adapter methods compared", "compare_methods", setup),
        "| method | lr | trainable params | bytes per client per round (float32, each way) "
        "| eval perplexity before | after | wall time |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| `{r['method']}` | {r['lr']:g} | {r['trainable-params']:,} | {r['bytes-per-client-per-round']:,} "
        f"| {r['perplexity-before']:.2f} | {r['perplexity-after']:.2f} | {r['wall-s']:.0f} s |"
        for r in rows
    ]
    lines += [
        "",
        f"Memory of the base model a worker holds: float32 {memory['lora']} MiB, "
        f"4-bit NF4 (QLoRA, double quantisation) {memory['qlora']} MiB.",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
