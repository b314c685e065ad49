"""Server aggregation strategies, one class per module, selected by ``strategy.name``.

``strategy.name`` is a name below or the import path ``package.module:Class``
of any :class:`strategies.base.AdapterStrategy` subclass (docs/strategies.md).
"""

from __future__ import annotations

import importlib

from fedlora.config import ConfigError, RunConfig, client_rank, client_task
from strategies.adalora_merge import AdaLoRAMerge
from strategies.base import AdapterStrategy, Cohorts, NodeProfile
from strategies.fedavg_factors import FedAvgFactors
from strategies.fedavg_products import FedAvgProducts
from strategies.fedsa import FedSA
from strategies.flexlora import FlexLoRA
from strategies.flora import FLoRA
from strategies.hetlora import HetLoRA
from strategies.local_only import LocalOnly
from strategies.mtlora import MTLoRA

STRATEGIES: dict[str, type[AdapterStrategy]] = {
    "fedavg-factors": FedAvgFactors,
    "fedavg-products": FedAvgProducts,
    "hetlora": HetLoRA,
    "flexlora": FlexLoRA,
    "flora": FLoRA,
    "adalora-merge": AdaLoRAMerge,
    "mtlora": MTLoRA,
    "fedsa": FedSA,
    "local-only": LocalOnly,
}


def strategy_class(name: str) -> type[AdapterStrategy]:
    """The class registered as ``name``, or imported from ``package.module:Class``."""
    if name in STRATEGIES:
        return STRATEGIES[name]
    module, _, attr = name.partition(":")
    if not attr:
        raise ConfigError(f"unknown strategy '{name}'; expected one of {', '.join(STRATEGIES)} or 'module:Class'")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"strategy.name='{name}': cannot import it ({err})") from err
    if not (isinstance(cls, type) and issubclass(cls, AdapterStrategy)):
        raise ConfigError(f"strategy.name='{name}' is not a subclass of strategies.base.AdapterStrategy")
    return cls


def build_strategy(cfg: RunConfig) -> AdapterStrategy:
    """The strategy named by ``strategy.name``, with the run's sampling settings and its own options."""
    cls = strategy_class(cfg.strategy.name)
    min_nodes = cfg.run.min_train_nodes
    cohorts = None
    if cfg.cohort.clients:
        cohorts = Cohorts(
            cfg.cohort.clients,
            cfg.cohort.size,
            lambda client: NodeProfile(client_rank(cfg, client), client_task(cfg, client)),
        )
    return cls(
        fraction_train=cfg.run.fraction_train,
        fraction_evaluate=cfg.run.fraction_evaluate,
        min_train_nodes=min_nodes,
        min_evaluate_nodes=min_nodes,
        min_available_nodes=min_nodes,
        wire_dtype=cfg.wire.dtype,
        min_replies=cfg.run.min_replies,
        max_update_norm=cfg.run.max_update_norm,
        cohorts=cohorts,
        **cls.options(cfg),
    )


__all__ = [
    "STRATEGIES",
    "AdaLoRAMerge",
    "AdapterStrategy",
    "FLoRA",
    "FedAvgFactors",
    "FedAvgProducts",
    "FedSA",
    "FlexLoRA",
    "HetLoRA",
    "LocalOnly",
    "MTLoRA",
    "build_strategy",
    "strategy_class",
]
