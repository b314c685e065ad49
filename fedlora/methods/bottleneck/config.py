"""The peft config of bottleneck adapters (:class:`BottleneckConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import PeftConfig

ACTIVATIONS = ("relu", "gelu", "silu", "tanh")
"""Keys of ``transformers.activations.ACT2FN`` a bottleneck may use between its projections."""

PEFT_TYPE = "BOTTLENECK"
"""The ``peft_type`` saved in ``adapter_config.json``; peft finds the classes by it once :func:`register` ran."""


DEFAULT_TARGETS = {
    "llama": ["o_proj", "down_proj"],
    "mistral": ["o_proj", "down_proj"],
    "qwen2": ["o_proj", "down_proj"],
    "bert": ["attention.output.dense", "output.dense"],
}
"""Per architecture, the projections whose outputs are the attention block's and the feed-forward block's results."""


@dataclass
class BottleneckConfig(PeftConfig):
    """Houlsby bottleneck adapters on the outputs of ``target_modules``.

    Each adapted module's output ``h`` becomes ``h + W_up·act(W_down·h + b_down) + b_up``.
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Modules whose output gets an adapter; None: the architecture's attention and FFN outputs."},
    )
    bottleneck_size: int = field(default=16, metadata={"help": "Width m of the bottleneck (down: d→m, up: m→d)."})
    activation: str = field(default="relu", metadata={"help": f"Non-linearity, one of {', '.join(ACTIVATIONS)}."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules besides the adapters that train and are saved (a new head)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"bottleneck activation '{self.activation}'; expected one of {', '.join(ACTIVATIONS)}")
        if self.bottleneck_size < 1:
            raise ValueError(f"the bottleneck size must be at least 1, got {self.bottleneck_size}")
