"""LISA across clients: the server samples the round's layers, sends them, and averages what comes back.

Pan et al., "LISA: Layerwise Importance Sampling for Memory-Efficient Large
Language Model Fine-Tuning", NeurIPS 2024, https://arxiv.org/abs/2403.17919,
federated (``adapter.method = "lisa"``, :mod:`fedlora.methods.lisa`).

The global state is the whole model, every parameter by name. Round t trains
the γ layers :func:`fedlora.layerwise.sample_layers` draws from the run's
seed and t's period, with everything outside the layers (embeddings, final
norm, head). Every client is sent (:func:`fedlora.layerwise.round_message`)
those under their own names, the layers trained in earlier rounds as frozen
tensors, and nothing of the layers never trained; it replies with exactly
the plainly named tensors (checked like any reply), and their element-wise
weighted mean replaces them in the global state. Clients keep nothing
between rounds, so a client that was not sampled for a while, a fresh
process, or a worker whose cached model served another client, is in sync
again from one message. The cost is the download: it grows with the layers
trained so far, up to the whole model; the upload is the round's layers and
the embeddings (docs/methods.md measures both).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fedlora.aggregation import average_states
from fedlora.config import RunConfig
from fedlora.layerwise import layers_trained_before, num_layers, round_message, sample_layers
from strategies.base import AdapterStrategy


class LISA(AdapterStrategy):
    """γ sampled layers (plus embeddings and head) train each round; their weighted mean replaces them."""

    def __init__(self, *, seed: int = 0, layers: int = 2, period: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seed, self.gamma, self.period = seed, layers, period

    @classmethod
    def options(cls, cfg: RunConfig) -> dict[str, Any]:
        """The seed the layers are drawn from, γ (``lisa.layers``) and ``lisa.period``."""
        return {"seed": cfg.run.seed, "layers": cfg.lisa.layers, "period": cfg.lisa.period}

    @classmethod
    def server_optimizer_refusal(cls, cfg: RunConfig) -> str:
        """Refused: its moments would keep moving layers after they stopped training, unseen by the clients' plan."""
        return "the trainable layers change every round, so a server optimiser's step has no fixed tensors to move"

    def plan(self) -> tuple[int, int, int, int, int]:
        """The arguments of the current round's sampling: seed, round, number of layers, γ, period."""
        return self.seed, self.current_round, num_layers(self.global_state), self.gamma, self.period

    def message_state(self) -> dict[str, Tensor]:
        """The round's layers and the non-layer parameters to train; earlier rounds' layers frozen."""
        return round_message(self.global_state, set(sample_layers(*self.plan())), layers_trained_before(*self.plan()))

    def aggregate_states(
        self, server_round: int, states: list[dict[str, Tensor]], weights: list[float]
    ) -> dict[str, Tensor]:
        """The whole model with the trained tensors replaced by their weighted mean."""
        self.round_log[server_round]["lisa-layers"] = sample_layers(*self.plan())
        return {**self.global_state, **average_states(states, weights)}
