"""Delta-LoRA: the frozen base weight also moves, by λ times the change of the LoRA product at every step.

Zi et al., "Delta-LoRA: Fine-Tuning High-Rank Parameters with the Delta of
Low-Rank Matrices", 2023, https://arxiv.org/abs/2309.02411. After each
optimizer step t the base weight receives ``W ← W + λ·s·(B_{t+1}A_{t+1} − B_t A_t)``
(λ is ``deltalora.update-ratio``, s = alpha/r), so the model learns a
higher-rank update than B·A alone at no extra memory: no gradient or optimizer
state for W. The paper's warm-up before W starts to move is not implemented,
and it trains without LoRA dropout (set ``adapter.dropout = 0`` to match).

Federated, the base deltas telescope: over a round, client k's base moves by
exactly ``λ·s·(B_k A_k − B_g A_g)``, with (B_g, A_g) the global adapter it was
sent, so the server computes every client's base delta from the factors it
already receives and sends. :class:`strategies.delta_lora.DeltaLoRA` keeps the
weighted mean of those deltas, summed over rounds, as a low-rank **residual**
(FLoRA's mechanism, :func:`fedlora.residual.set_residual`): exact, merged into
every party's base, never a dense d×k on the wire. The LoRA factors travel and
aggregate as LoRA's. On the client, the step hook adds each step's delta to
the base in place and keeps an exact factor account of what the base now holds
(:func:`fedlora.residual.add_to_base`), so the next message resets a cached
model's base to ``W0 + residual`` as FLoRA's does. The saved adapter is
residual and LoRA stacked into one peft LoRA (:func:`fedlora.residual.save_stacked`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from peft import PeftModel
from torch import Tensor

from fedlora.aggregation import stack_factors
from fedlora.config import RunConfig, opt
from fedlora.keys import lora_pairs, module_of
from fedlora.methods.lora import LORA_OPTIONS, Lora
from fedlora.residual import add_to_base, merged_residual


@dataclass(frozen=True)
class DeltaLoraSettings:
    """Delta-LoRA (``adapter.method='delta-lora'``, with ``strategy.name='delta-lora'``)."""

    section: ClassVar[str] = "deltalora"

    update_ratio: float = opt(
        0.5,
        "λ: after every step the base weight moves by λ·(alpha/r)·Δ(B·A), the change of the LoRA product.",
        check=lambda v, _: 0 <= v < math.inf,
    )


def factors(params: dict[str, torch.nn.Parameter], a_key: str, b_key: str) -> tuple[Tensor, Tensor]:
    """A detached copy of one layer's ``(B, A)``."""
    return params[b_key].detach().clone(), params[a_key].detach().clone()


class DeltaLora(Lora):
    """LoRA whose product's change also updates the base weight, λ times."""

    name = "delta-lora"
    settings = DeltaLoraSettings
    uses = LORA_OPTIONS
    strategy = "delta-lora"  # keeps the clients' base deltas as an exact residual

    def step_hook(self, model: PeftModel, cfg: RunConfig, server_round: int) -> Callable[[int], None]:
        """After every step add ``λ·s·Δ(B·A)`` to each base weight; account the base as residual + λ·s·(BA − B₀A₀)."""
        rate = cfg.deltalora.update_ratio * cfg.adapter.alpha / cfg.adapter.r
        params = dict(model.named_parameters())
        trainable = (name for name, param in params.items() if param.requires_grad)
        layers = {module_of(a): (a, b) for a, b in lora_pairs(trainable).values()}
        start = {module: factors(params, a, b) for module, (a, b) in layers.items()}
        residual = merged_residual(model)  # W0 + this residual: the base this client was sent
        previous = dict(start)

        def step(_: int) -> None:
            now = {module: factors(params, a, b) for module, (a, b) in layers.items()}
            updates, held = {}, {}
            for module in layers:
                (b, a), (b_prev, a_prev), (b_0, a_0) = now[module], previous[module], start[module]
                updates[module] = stack_factors([b, b_prev], [a, a_prev], [rate, -rate])
                b_held, a_held = stack_factors([b, b_0], [a, a_0], [rate, -rate])
                if module in residual:
                    b_held = torch.cat([residual[module][0].to(b_held), b_held], 1)
                    a_held = torch.cat([residual[module][1].to(a_held), a_held], 0)
                held[module] = (b_held, a_held)
            add_to_base(model, updates, {**residual, **held})
            previous.update(now)

        return step
