"""Bytes per client and round of LISA against LoRA, as the layers trained so far add up (issue 17).

``python -m simulations.lisa_bytes --rounds 16`` (SmolLM2-135M, ``lisa.layers``
at its default) or ``--model <folder>``. Per round it prints what one client
is sent for training (the round's layers, embeddings, final norm and head, and
every layer trained in an earlier round, frozen) and sends back (the round's
layers, embeddings, norm and head), as Flower's ``count_bytes`` of the packed
record (:func:`fedlora.wire.record_nbytes`), next to LoRA's message for the
default ``adapter.*`` settings. Nothing trains: the sizes depend only on which
layers the run's seed samples, not on the values.
"""

from __future__ import annotations

import argparse

from fedlora import runtime
from fedlora.adapter import adapter_state
from fedlora.config import from_run_config
from fedlora.keys import trained_part
from fedlora.layerwise import layers_trained_before, sample_layers
from fedlora.wire import record_nbytes, to_record
from strategies import LISA


def main() -> None:
    """One Markdown row per round: bytes down and up per client, against LoRA's, and the layers trained so far."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--layers", type=int, default=2, help="lisa.layers (γ)")
    args = parser.parse_args()
    lora_cfg = from_run_config({"model.name": args.model})
    lora_bytes = record_nbytes(to_record(adapter_state(runtime.workbench(lora_cfg).model), lora_cfg.wire.dtype))
    cfg = from_run_config(
        {"model.name": args.model, "adapter.method": "lisa", "strategy.name": "lisa", "lisa.layers": args.layers}
    )
    strategy = LISA(**LISA.options(cfg))
    strategy.global_state = runtime.workbench(cfg).initial
    whole = record_nbytes(to_record(strategy.global_state, cfg.wire.dtype))
    print(f"{args.model}: LoRA r={cfg.adapter.r} ({cfg.wire.dtype}) {lora_bytes:,} bytes each way per client, round;")
    print(f"the whole model {whole:,} bytes; LISA with lisa.layers={args.layers}:")
    print("| round | layers | down per client (bytes) | × LoRA | up per client (bytes) | × LoRA | trained before |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for server_round in range(1, args.rounds + 1):
        strategy.current_round = server_round
        message = strategy.message_state()
        down = record_nbytes(to_record(message, cfg.wire.dtype))
        up = record_nbytes(to_record(trained_part(message), cfg.wire.dtype))
        plan = strategy.plan()
        layers = ",".join(map(str, sample_layers(*plan)))
        before = len(layers_trained_before(*plan))
        print(
            f"| {server_round} | {layers} | {down:,} | {down / lora_bytes:.0f} | {up:,} | {up / lora_bytes:.0f} | "
            f"{before}/{plan[2]} |"
        )


if __name__ == "__main__":
    main()
