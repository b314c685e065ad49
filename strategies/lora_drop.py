"""LoRA-drop across clients: every layer trains for a few rounds, then only the layers whose LoRA output matters.

Zhou et al., "LoRA-drop: Efficient LoRA Parameters Pruning based on Output
Evaluation", 2024, https://arxiv.org/abs/2402.07721, federated
(``adapter.method = "lora-drop"``, :mod:`fedlora.methods.lora_drop`).

For ``loradrop.warmup-rounds`` rounds every LoRA layer trains and travels. The
last of them asks the clients (config ``layer-importance = true``) to measure,
after training, each layer's ‖ΔW·x‖² on a sample of their data; a reply then
carries the report (a ConfigRecord ``layer-importance``: exactly the adapter's
LoRA layers, each a finite non-negative number, else the reply is excluded).
The server averages the reports weighted like the updates, normalises them and
keeps the most important layers (``loradrop.threshold`` of the total, or the top
``loradrop.keep-layers``; :func:`fedlora.layer_importance.choose_layers`), and
zeroes the other layers' factors in the global adapter: they are removed, not
shared. From the next round on, each training instruction names the kept
layers (``trainable-layers``) and carries only their tensors (and any tensor
that is not a LoRA factor); replies must hold exactly those. The global adapter
the server keeps, evaluates, checkpoints and saves still holds every layer (the
dropped ones zero), so evaluation messages carry it whole.

The choice is recorded in the round's log (``lora-drop-kept``,
``lora-drop-importance``: metrics.json and the checkpoint), and read back from
it, so a resumed run trains the same layers; if the choosing round's
aggregation fails, the next round asks again. The trained tensors are
aggregated as ``strategy.within`` (``fedavg-factors`` or
``fedavg-products``) does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from torch import Tensor

from fedlora.aggregators import within_aggregator
from fedlora.config import ConfigError, RunConfig
from fedlora.keys import LAYER_IMPORTANCE, TRAINABLE_LAYERS
from fedlora.layer_importance import choose_layers, drop_layers, layers_state, lora_layers, mean_importance, normalised
from fedlora.validation import InvalidUpdate
from fedlora.wire import from_record, to_record
from strategies.base import AdapterStrategy, ClientReply

IMPORTANCE = "#layer-importance"  # the importance report added to a decoded reply, in lora_layers order
KEPT_LOG, IMPORTANCE_LOG, TRAINED_LOG = "lora-drop-kept", "lora-drop-importance", "trained-layers"


class LoRADrop(AdapterStrategy):
    """Every LoRA layer for the warm-up rounds, then only those the clients' importance reports keep."""

    def __init__(
        self,
        *,
        warmup_rounds: int = 1,
        threshold: float = 0.9,
        keep_layers: int = 0,
        within: str = "fedavg-factors",
        **kwargs: Any,
    ) -> None:
        super().__init__(aggregator=within_aggregator(within), **kwargs)
        self.warmup_rounds, self.threshold, self.keep_layers = warmup_rounds, threshold, keep_layers
        self.asking = False  # whether this round's clients were asked for their importance reports

    @classmethod
    def options(cls, cfg: RunConfig) -> dict[str, Any]:
        """The ``loradrop.*`` settings and ``strategy.within``; virtual clients (cohorts) are refused."""
        if cfg.cohort.clients:
            raise ConfigError("cohort.clients does not apply to strategy.name='lora-drop' (one adapter per message)")
        d = cfg.loradrop
        return {
            "warmup_rounds": d.warmup_rounds,
            "threshold": d.threshold,
            "keep_layers": d.keep_layers,
            "within": cfg.strategy.within,
        }

    @classmethod
    def server_optimizer_refusal(cls, cfg: RunConfig) -> str:
        """Refused: the drop zeroes layers outright, which a step with momentum would undo."""
        return "the drop zeroes the dropped layers outright, and a step (with its momentum) would revive them"

    @classmethod
    def sum_refusal(cls, cfg: RunConfig) -> str:
        """Refused: the choice needs each client's report, and the sum-only path aggregates the whole adapter."""
        return "the layer choice needs each client's importance report, and the sum-only path sends the whole adapter"

    @property
    def kept(self) -> list[str] | None:
        """The layers chosen to keep, from the round log (so a resumed run has them); None before the choice."""
        return next((list(entry[KEPT_LOG]) for entry in self.round_log.values() if KEPT_LOG in entry), None)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask for importance reports from the last warm-up round until a choice is made; then send the kept layers."""
        current, kept = server_round + self.round_offset, self.kept
        self.asking = kept is None and current >= self.warmup_rounds
        config[LAYER_IMPORTANCE] = self.asking
        if kept is None:
            return super().configure_train(server_round, arrays, config, grid)
        full = from_record(arrays)
        config[TRAINABLE_LAYERS] = kept
        messages = super().configure_train(server_round, to_record(layers_state(full, kept), self.wire_dtype), config,
                                           grid)  # fmt: skip
        self.global_state = full  # replies are checked against what was sent (self.sent), aggregated into the whole
        self.round_log[current][TRAINED_LOG] = len(kept)
        return messages

    def decode_reply(self, reply: ClientReply) -> tuple[dict[str, Tensor], float]:
        """The reply's tensors plus, in a round that asked for it, its importance report under ``#layer-importance``."""
        state, weight = super().decode_reply(reply)
        if not self.asking:
            return state, weight
        record = reply.content.config_records.get(LAYER_IMPORTANCE) if reply.content else None
        if record is None:
            raise InvalidUpdate(f"no '{LAYER_IMPORTANCE}' report, which this round asked for")
        layers = lora_layers(self.global_state)
        if set(record) != set(layers):
            raise InvalidUpdate(f"'{LAYER_IMPORTANCE}' must name exactly the adapter's {len(layers)} LoRA layers, "
                                f"got {len(record)} names")  # fmt: skip
        values = [record[layer] for layer in layers]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < math.inf for v in values):
            raise InvalidUpdate(f"'{LAYER_IMPORTANCE}' values must be finite non-negative numbers")
        return {**state, IMPORTANCE: torch.tensor(values, dtype=torch.float64)}, weight

    def aggregate_states(
        self, server_round: int, states: list[dict[str, Tensor]], weights: list[float]
    ) -> dict[str, Tensor]:
        """The trained tensors aggregated by ``strategy.within``; in the choosing round, the drop."""
        trained = [{k: v for k, v in s.items() if k != IMPORTANCE} for s in states]
        new_state = super().aggregate_states(server_round, trained, weights)  # a layer none sent keeps its value
        if not self.asking:
            return new_state
        layers = lora_layers(self.global_state)
        importance = mean_importance([dict(zip(layers, s[IMPORTANCE].tolist(), strict=True)) for s in states], weights)
        kept = choose_layers(importance, self.threshold, self.keep_layers)
        log(INFO, "round %d: LoRA-drop keeps %d of %d layers", server_round, len(kept), len(layers))
        self.round_log[server_round][IMPORTANCE_LOG] = normalised(importance)
        self.round_log[server_round][KEPT_LOG] = sorted(kept)
        return drop_layers(new_state, kept)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The base's; a choice whose adapter was not accepted is forgotten, so the next round asks again."""
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            entry = self.round_log[server_round + self.round_offset]
            entry.pop(KEPT_LOG, None)
            entry.pop(IMPORTANCE_LOG, None)
        return arrays, metrics
