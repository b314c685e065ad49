"""Bytes per client and round of Delta-LoRA against LoRA on SmolLM2, as the residual grows (issue 17).

``python -m simulations.delta_lora_bytes --clients 3 --rounds 12``. The
``delta-lora`` strategy aggregates, round after round, replies of ``--clients``
clients whose factors differ from the global ones by random full-rank
perturbations (trained factors are full rank too, so the residual's rank grows
as it would in training: by up to (K+1)·r per round until a layer's full
rank). Per round it prints the bytes one client receives (the global adapter
with its residual, Flower's ``count_bytes`` of the record as sent) and sends
(LoRA's factors), next to plain LoRA's, for the default ``adapter.*`` settings.
"""

from __future__ import annotations

import argparse

import torch

from fedlora import runtime
from fedlora.adapter import adapter_state
from fedlora.config import from_run_config
from fedlora.keys import RESIDUAL_A, trained_part
from fedlora.wire import record_nbytes, to_record
from strategies import DeltaLoRA


def main() -> None:
    """One Markdown row per round: bytes down and up per client, Delta-LoRA and LoRA, and the residual's rank."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    cfg = from_run_config({"adapter.method": "delta-lora", "strategy.name": "delta-lora"})
    lora = adapter_state(runtime.workbench(cfg).model)
    lora_bytes = record_nbytes(to_record(lora, cfg.wire.dtype))
    strategy = DeltaLoRA(**DeltaLoRA.options(cfg))
    strategy.global_state = lora
    gen = torch.Generator().manual_seed(0)
    print(f"LoRA r={cfg.adapter.r} on SmolLM2 ({cfg.wire.dtype}): {lora_bytes:,} bytes each way per client and round")
    print("| round | Delta-LoRA down per client (bytes) | × LoRA | up per client (bytes) | residual rank (max) |")
    print("| --- | --- | --- | --- | --- |")
    for server_round in range(1, args.rounds + 1):
        down = record_nbytes(to_record(strategy.global_state, cfg.wire.dtype))
        sent = trained_part(strategy.global_state)
        replies = [
            {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in sent.items()} for _ in range(args.clients)
        ]
        up = record_nbytes(to_record(replies[0], cfg.wire.dtype))
        ranks = [v.shape[0] for k, v in strategy.global_state.items() if k.endswith(RESIDUAL_A)]
        print(f"| {server_round} | {down:,} | {down / lora_bytes:.1f} | {up:,} | {max(ranks, default=0)} |")
        strategy.global_state = strategy.aggregate_states(server_round, replies, [1.0] * args.clients)


if __name__ == "__main__":
    main()
