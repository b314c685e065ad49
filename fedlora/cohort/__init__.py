"""Cohorts: many virtual clients trained together by one worker over one base model (docs/simulation.md).

:mod:`fedlora.cohort.protocol` is how a cohort travels in one Flower message;
:mod:`fedlora.cohort.stacked` stacks the clients' adapters over the base;
:mod:`fedlora.cohort.train` trains them in one batched pass per step.
:func:`sequential_reason` decides whether a cohort can be batched at all.
"""

from __future__ import annotations

from peft import PeftModel

from fedlora.cohort.stacked import blocker
from fedlora.config import ConfigError, RunConfig
from fedlora.methods.base import AdapterMethod
from fedlora.models import REWARD, resolve_task


def sequential_reason(cfg: RunConfig, method: AdapterMethod, model: PeftModel) -> str:
    """Why this run's cohorts are trained one client after another ("" when they are batched).

    Raises :class:`ConfigError` naming ``cohort.batching`` when it forces
    batching for a method that cannot be batched.
    """
    if cfg.cohort.batching == "sequential":
        return "cohort.batching = 'sequential'"
    reason = blocker(model)
    if not reason and type(method).step_hook is not AdapterMethod.step_hook:
        reason = "the method changes the adapter after every local step (one schedule per client)"
    if not reason and cfg.train.keep_optimizer_state:
        reason = "train.keep-optimizer-state restores one optimizer per client from the store"
    if not reason and cfg.train.grad_accumulation > 1:
        reason = "train.grad-accumulation > 1 (the batched pass takes one batch per client and step)"
    if not reason and cfg.train.proximal_mu:
        reason = "train.proximal-mu > 0 (FedProx's term is added in the one-client training loop)"
    if not reason and resolve_task(cfg.model.name, cfg.model.task) == REWARD:
        reason = "model.task = 'reward' (the batched pass computes per-client token or class losses, not pair losses)"
    if not reason and cfg.train.precision == "float16":
        reason = "train.precision = 'float16' (one loss scaler would skip every client's step for one's overflow)"
    if not reason and cfg.train.epochs:
        reason = "train.epochs > 0 (clients of different sizes take different numbers of steps)"
    if reason and cfg.cohort.batching == "batched":
        raise ConfigError(
            f"cohort.batching='batched', but adapter.method='{cfg.adapter.method}' cannot batch: {reason}"
        )
    return reason
