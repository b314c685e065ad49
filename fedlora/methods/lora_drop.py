"""LoRA-drop: LoRA on the layers whose output matters; the others are dropped after a first phase.

Zhou et al., "LoRA-drop: Efficient LoRA Parameters Pruning based on Output
Evaluation", 2024, https://arxiv.org/abs/2402.07721. After LoRA trains briefly,
each LoRA layer's importance is its output's mean squared norm ‖ΔW·x‖² =
‖s·B·A·x‖² over a data sample; the layers whose normalised importance adds up
to a threshold keep their LoRA, the others share one.

Federated (strategy ``lora-drop``, :class:`strategies.lora_drop.LoRADrop`): every
layer trains and travels for ``loradrop.warmup-rounds`` rounds; in the last of
them each client also measures the importance on ``loradrop.sample-batches`` of
its training batches, after training; the server averages the clients' reports
weighted by examples and chooses the kept layers. From then on only the kept
layers train and travel: each training instruction names them
(``trainable-layers``) and :meth:`LoraDrop.train_layers` freezes the rest. A
dropped layer is **removed**, not shared: its factors are zero on every party
(ΔW = 0), so nobody needs them sent. The saved adapter still holds every layer,
the dropped ones as zeros, and loads with ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from fedlora.config import opt
from fedlora.keys import is_lora_a, is_lora_b, module_of
from fedlora.methods.lora import LORA_OPTIONS, Lora


@dataclass(frozen=True)
class LoraDropSettings:
    """LoRA-drop (``adapter.method='lora-drop'``, with ``strategy.name='lora-drop'``)."""

    section: ClassVar[str] = "loradrop"

    warmup_rounds: int = opt(
        1,
        "Rounds in which every LoRA layer trains; after the last of them, in which clients also measure each "
        "layer's importance ‖ΔW·x‖², the server keeps the most important layers and drops (zeroes) the rest.",
        check=lambda v, cfg: 1 <= v <= cfg.run.num_server_rounds,
    )
    threshold: float = opt(
        0.9,
        "Keep the fewest layers whose normalised importance adds up to at least this share (the paper's 0.9).",
        check=lambda v, _: 0 < v <= 1,
    )
    keep_layers: int = opt(
        0, "Keep this many most important layers instead (0: use `threshold`).", check=lambda v, _: v >= 0
    )
    sample_batches: int = opt(
        4, "Training batches a client measures the importance on (after its local training).", check=lambda v, _: v >= 1
    )


class LoraDrop(Lora):
    """Plain LoRA whose trainable layers the server narrows once, after the warm-up rounds."""

    name = "lora-drop"
    settings = LoraDropSettings
    uses = LORA_OPTIONS  # not adapter.rank-tiers: LoRA-drop is not offered with rank tiers
    strategy = "lora-drop"  # the server chooses the kept layers

    def train_layers(self, model: PeftModel, layers: list[str] | None) -> None:
        """Freeze and zero every LoRA layer not in ``layers`` (``None``: every layer trains again).

        Zeroing makes a dropped layer the same on every party without sending it
        (its update B·A is 0, as on the server); the next instruction overwrites
        whatever trains, so nothing of a previous client survives either way.
        """
        factors = {name: p for name, p in model.named_parameters() if is_lora_a(name) or is_lora_b(name)}
        if layers is not None and (unknown := set(layers) - {module_of(name) for name in factors}):
            raise ValueError(f"the server's trainable layers include modules without LoRA: {sorted(unknown)}")
        with torch.no_grad():
            for name, param in factors.items():
                kept = layers is None or module_of(name) in layers
                param.requires_grad_(kept)
                if not kept:
                    param.zero_()

    def layer_importance(self, model: PeftModel, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, float]:
        """Per LoRA layer, ‖s·B·A·x‖² averaged over the batches' tokens (padding left out), in eval mode.

        A forward hook on each layer's ``lora_B`` reads ``B·A·x`` as peft computes
        it (dropout is off in eval mode), scaled by the layer's ``alpha / r``.
        """
        adapter = model.active_adapter
        layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_B}
        sums = dict.fromkeys(layers, 0.0)
        mask: list[torch.Tensor] = []  # the current batch's attention mask

        def hook(name: str, scaling: float) -> Callable[[torch.nn.Module, tuple, torch.Tensor], None]:
            def record(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
                squares = output.detach().double().pow(2).sum(-1) * scaling**2
                sums[name] += float((squares * mask[0].to(squares.device)).sum())

            return record

        handles = [m.lora_B[adapter].register_forward_hook(hook(n, m.scaling[adapter])) for n, m in layers.items()]
        was_training, tokens = model.training, 0.0
        model.eval()
        device = next(model.parameters()).device
        try:
            with torch.no_grad():
                for batch in batches:
                    mask[:] = [batch["attention_mask"].double()]
                    tokens += float(mask[0].sum())
                    model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
        if not tokens:
            raise ValueError("no token to measure the layer importance on")
        return {name: total / tokens for name, total in sums.items()}
