"""Server aggregation strategies, one class per module, selected by ``strategy.name``.

``strategy.name`` is a name below or the import path ``package.module:Class``
of any :class:`strategies.base.AdapterStrategy` subclass (docs/strategies.md).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

from fedlora.config import ConfigError, RunConfig, client_rank, client_task
from fedlora.server_opt import ServerOptimizer
from strategies.adalora_merge import AdaLoRAMerge
from strategies.base import AdapterStrategy, Cohorts, NodeProfile
from strategies.delta_lora import DeltaLoRA
from strategies.fedavg_factors import FedAvgFactors
from strategies.fedavg_products import FedAvgProducts
from strategies.fedsa import FedSA
from strategies.flexlora import FlexLoRA
from strategies.flora import FLoRA
from strategies.hetlora import HetLoRA
from strategies.lisa import LISA
from strategies.local_only import LocalOnly
from strategies.lora_drop import LoRADrop
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
    "delta-lora": DeltaLoRA,
    "lora-drop": LoRADrop,
    "lisa": LISA,
}


def strategy_class(name: str) -> type[AdapterStrategy]:
    """The class registered as ``name``, or imported from ``package.module:Class``.

    A path is operator-trusted code: importing it runs the module's top level.
    Before that, the module must exist (``find_spec``, which imports only its
    parent packages) and, when it is a Python source file, define ``Class`` at
    its top level, so a typo never runs an unrelated module.
    """
    if name in STRATEGIES:
        return STRATEGIES[name]
    module, _, attr = name.partition(":")
    if not attr:
        raise ConfigError(f"unknown strategy '{name}'; expected one of {', '.join(STRATEGIES)} or 'module:Class'")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ConfigError(f"strategy.name='{name}': cannot import it (no module '{module}')")
    if spec.origin and spec.origin.endswith(".py") and attr not in _top_level_names(Path(spec.origin)):
        raise ConfigError(f"strategy.name='{name}': module '{module}' ({spec.origin}) defines no '{attr}'")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"strategy.name='{name}': cannot import it ({err})") from err
    if not (isinstance(cls, type) and issubclass(cls, AdapterStrategy)):
        raise ConfigError(f"strategy.name='{name}' is not a subclass of strategies.base.AdapterStrategy")
    return cls


def _top_level_names(source: Path) -> set[str]:
    """Names a Python source file binds at its top level (classes, functions, assignments, imports)."""
    names = set()
    for node in ast.parse(source.read_text(encoding="utf-8"), str(source)).body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


def check_private(cfg: RunConfig, cls: type[AdapterStrategy]) -> None:
    """Secure aggregation and DP leave the server a sum of updates: refuse what needs each client's update."""
    on = [key for key, value in (("secagg.enabled", cfg.secagg.enabled), ("dp.clip-norm", cfg.dp.clip_norm)) if value]
    if not on:
        return
    problems = []
    if reason := cls.sum_refusal(cfg):
        problems.append(f"strategy.name='{cfg.strategy.name}' cannot run on a sum of updates: {reason}")
    if cfg.dp.clip_norm and (reason := cls.noise_refusal(cfg)):
        problems.append(f"strategy.name='{cfg.strategy.name}' cannot take client-level DP: {reason}")
    if cfg.strategy.robust != "none":
        problems.append(
            f"strategy.robust='{cfg.strategy.robust}' needs each client's update (a median, a trimmed mean, "
            "a norm ranking), which the server no longer sees or which would change the DP sensitivity"
        )
    if cfg.cohort.clients:
        problems.append("cohort.clients (virtual clients) is not supported with them yet")
    if problems:
        raise ConfigError(f"{' and '.join(on)}: " + "; ".join(problems))


def build_strategy(cfg: RunConfig) -> AdapterStrategy:
    """The strategy named by ``strategy.name``, with the run's sampling settings and its own options."""
    cls = strategy_class(cfg.strategy.name)
    check_private(cfg, cls)
    server_optimizer = None
    if cfg.strategy.server_optimizer != "none":
        if reason := cls.server_optimizer_refusal(cfg):
            raise ConfigError(
                f"strategy.server-optimizer='{cfg.strategy.server_optimizer}' does not apply to "
                f"strategy.name='{cfg.strategy.name}': {reason}"
            )
        s = cfg.strategy
        server_optimizer = ServerOptimizer(
            s.server_optimizer, s.server_lr, s.server_momentum, s.server_beta1, s.server_beta2, s.server_tau
        )
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
        max_weight_ratio=cfg.run.max_weight_ratio,
        robust=cfg.strategy.robust,
        trim_fraction=cfg.strategy.trim_fraction,
        server_optimizer=server_optimizer,
        secagg=cfg.secagg if cfg.secagg.enabled else None,
        privacy=cfg.dp if cfg.dp.clip_norm else None,
        **cls.options(cfg),
    )


__all__ = [
    "LISA",
    "STRATEGIES",
    "AdaLoRAMerge",
    "AdapterStrategy",
    "DeltaLoRA",
    "FLoRA",
    "FedAvgFactors",
    "FedAvgProducts",
    "FedSA",
    "FlexLoRA",
    "HetLoRA",
    "LoRADrop",
    "LocalOnly",
    "MTLoRA",
    "build_strategy",
    "strategy_class",
]
