"""Server aggregation strategies, one class per module, selected by ``strategy.name``."""

from __future__ import annotations

from fedlora.config import RunConfig
from strategies.base import AdapterStrategy
from strategies.fedavg_factors import FedAvgFactors
from strategies.fedavg_products import FedAvgProducts

STRATEGIES: dict[str, type[AdapterStrategy]] = {
    "fedavg-factors": FedAvgFactors,
    "fedavg-products": FedAvgProducts,
}


def build_strategy(cfg: RunConfig) -> AdapterStrategy:
    """The strategy named by ``strategy.name``, with the run's sampling settings."""
    name = cfg.strategy.name
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy '{name}'; expected one of {', '.join(STRATEGIES)}")
    min_nodes = cfg.run.min_train_nodes
    return STRATEGIES[name](
        fraction_train=cfg.run.fraction_train,
        fraction_evaluate=cfg.run.fraction_evaluate,
        min_train_nodes=min_nodes,
        min_evaluate_nodes=min_nodes,
        min_available_nodes=min_nodes,
        wire_dtype=cfg.wire.dtype,
        min_replies=cfg.run.min_replies,
        max_update_norm=cfg.run.max_update_norm,
    )


__all__ = ["STRATEGIES", "AdapterStrategy", "FedAvgFactors", "FedAvgProducts", "build_strategy"]
