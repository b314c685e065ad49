"""The base of strategies that split the adapter: tensors global, per group of clients, or local to each client.

Federated multi-task and personalised LoRA differ from FedAvg only in *who
shares which tensor*. A :class:`SplitStrategy` names, per tensor key, its scope:

* ``GLOBAL``: sent to every client and averaged over all of them;
* a group name (a task): sent to, and averaged over, only that group's clients;
* ``LOCAL``: never sent nor aggregated; it stays on the client, which keeps it
  between rounds in its on-disk store (:func:`fedlora.runtime.save_local_tensors`),
  because a client replies with exactly the tensors it was sent.

Within each scope, the averaging is that of ``strategy.within``
(:class:`fedlora.aggregators.FactorMean` or :class:`fedlora.aggregators.ProductMean`),
given only the shared tensors: an aggregator aggregates each tensor over the
states holding it, so one call covers every scope. A reply carrying another
group's tensors was not sent them, so the base rejects it. Client-side
evaluation is also reported per group (``client-eval-per-group`` in metrics.json).

Under secure aggregation (or DP) the server sums each scope over its own
clients (:meth:`SplitStrategy.sum_groups`): the global tensors over everyone,
a group's over that group; local tensors never travel. That is exact when
``strategy.within``'s aggregate is a mean (``fedavg-factors``, or
``fedavg-products`` with LoRA-FA).
"""

from __future__ import annotations

from abc import abstractmethod
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, ClassVar

from flwr.app import Message, MetricRecord
from torch import Tensor

from fedlora.aggregators import within_aggregator
from fedlora.config import RunConfig
from strategies.base import AdapterStrategy, ClientReply, NodeProfile
from strategies.fedavg_products import FedAvgProducts


class SplitStrategy(AdapterStrategy):
    """Aggregate each tensor over the clients that share it: all, a group, or none."""

    per_node = True
    GLOBAL: ClassVar[str] = "global"
    LOCAL: ClassVar[str] = "local"

    def __init__(self, *, within: str = "fedavg-factors", **kwargs: Any) -> None:
        super().__init__(aggregator=within_aggregator(within), **kwargs)

    @classmethod
    def options(cls, cfg: RunConfig) -> dict[str, Any]:
        """``strategy.within``."""
        return {"within": cfg.strategy.within}

    @classmethod
    def server_optimizer_refusal(cls, cfg: RunConfig) -> str:
        """Refused when the shared tensors are product-averaged (re-factorised), as for ``fedavg-products``."""
        if cfg.strategy.within == "fedavg-products":
            return "strategy.within='fedavg-products': " + FedAvgProducts.server_optimizer_refusal(cfg)
        return ""

    @classmethod
    def sum_refusal(cls, cfg: RunConfig) -> str:
        """As ``strategy.within``'s aggregator: a sum per scope computes a mean per scope."""
        if reason := within_aggregator(cfg.strategy.within, cfg.adapter.method == "lora-fa").sum_refusal:
            return f"strategy.within='{cfg.strategy.within}': {reason}"
        return ""

    def sum_groups(self) -> list[list[str]]:
        """One group per shared scope (global first where it comes first), each summed over its clients."""
        groups: dict[str, list[str]] = defaultdict(list)
        for key in self.global_state:
            if (scope := self.scope(key)) != self.LOCAL:
                groups[scope].append(key)
        return list(groups.values())

    def server_keys(self) -> list[str]:
        """The shared tensors (global and per group); local ones never reach the server."""
        return [k for k in super().server_keys() if self.scope(k) != self.LOCAL]

    @abstractmethod
    def scope(self, key: str) -> str:
        """``GLOBAL``, ``LOCAL`` or the name of the group whose clients share tensor ``key``."""

    def group(self, profile: NodeProfile) -> str:
        """The group a node belongs to (default: its task)."""
        return profile.task

    def client_state(self, profile: NodeProfile) -> dict[str, Tensor]:
        """The global tensors and those of the node's group; nothing local."""
        shared = (self.GLOBAL, self.group(profile))
        return {k: v for k, v in self.global_state.items() if self.scope(k) in shared}

    def aggregate_states(
        self, server_round: int, states: list[dict[str, Tensor]], weights: list[float]
    ) -> dict[str, Tensor]:
        """Each shared tensor aggregated over the clients holding it; local ones, and a group without replies, kept."""
        shared = {k: v for k, v in self.global_state.items() if self.scope(k) != self.LOCAL}
        return {**self.global_state, **self.record(server_round, self.aggregator.aggregate(shared, states, weights))}

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The overall weighted average, and one per group in ``round_log``."""
        server_round += self.round_offset
        answers = self.client_replies(replies)
        metrics = self.average_evaluations(server_round, answers)
        groups: dict[str, list[ClientReply]] = defaultdict(list)
        for answer in answers:
            profile = self.profiles.get(answer.client)
            if profile and answer.content is not None:
                groups[self.group(profile)].append(answer)
        per_group = {}
        for group, members in sorted(groups.items()):
            if group_metrics := self.average_evaluations(server_round, members):
                per_group[group or "all"] = dict(group_metrics)
        self.round_log[server_round]["client-eval-per-group"] = per_group
        self.round_log[server_round]["client-eval"] = dict(metrics) if metrics else {}
        return metrics
