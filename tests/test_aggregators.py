"""Aggregators (fedlora/aggregators.py): the rules every one keeps, on tensors; strategies composing them."""

from __future__ import annotations

import pytest
import torch
from test_multitask import global_state as mtlora_state
from test_multitask import task_keys

from fedlora.aggregation import product_average, weighted_average
from fedlora.aggregators import FactorMean, PaddedMean, ProductMean, within_aggregator
from strategies import MTLoRA
from strategies.base import AdapterStrategy


def template_and_states() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """MTLoRA-like states: shared tensors in all three, task a's in the first two, task b's in none."""
    template = {k: torch.from_numpy(v) for k, v in mtlora_state(0).items()}
    states = []
    for seed in (1, 2, 3):
        full = {k: torch.from_numpy(v) for k, v in mtlora_state(seed).items()}
        states.append({k: v for k, v in full.items() if "task-b" not in k and ("task-a" not in k or seed < 3)})
    return template, states


def test_a_tensor_is_averaged_over_the_states_holding_it_and_kept_when_none_does() -> None:
    template, states = template_and_states()
    weights = [1.0, 3.0, 4.0]
    out = FactorMean().aggregate(template, states, weights).state
    assert list(out) == list(template)
    a_key = task_keys("a")[0]
    torch.testing.assert_close(out[a_key], weighted_average([states[0][a_key], states[1][a_key]], [1.0, 3.0]))
    shared = "m.q.lora_A.default.weight"
    torch.testing.assert_close(out[shared], weighted_average([s[shared] for s in states], weights))
    for key in task_keys("b"):
        assert out[key] is template[key]


def test_product_mean_takes_each_layer_over_its_holders_and_reports_every_layer() -> None:
    template, states = template_and_states()
    weights = [1.0, 3.0, 4.0]
    result = ProductMean().aggregate(template, states, weights)
    a_key, b_key = task_keys("a")
    alone = product_average([s[b_key] for s in states[:2]], [s[a_key] for s in states[:2]], [1.0, 3.0], 2)
    torch.testing.assert_close(result.state[a_key], alone.a)
    torch.testing.assert_close(result.state[b_key], alone.b)
    errors = result.diagnostics["truncation-error-per-layer"]
    assert set(errors) == {"m.q.default", "m.o.task-a"}
    assert errors["m.o.task-a"] == pytest.approx(alone.truncation_error)
    assert result.diagnostics["truncation-error-max"] == max(errors.values())


def test_only_means_say_a_secure_sum_computes_them() -> None:
    assert FactorMean().sum_refusal == "" and ProductMean(frozen_a=True).sum_refusal == ""
    assert "needs each client's factors" in ProductMean().sum_refusal
    assert PaddedMean().sum_refusal and within_aggregator("fedavg-products").sum_refusal
    assert within_aggregator("fedavg-factors").sum_refusal == ""


def test_a_scoped_strategy_logs_the_diagnostics_of_every_scope() -> None:
    template, states = template_and_states()
    strategy = MTLoRA(tasks=("a", "b"), within="fedavg-products")
    strategy.global_state = template
    out = strategy.aggregate_states(4, states, [1.0, 3.0, 4.0])
    assert set(strategy.round_log[4]["truncation-error-per-layer"]) == {"m.q.default", "m.o.task-a"}
    assert all(out[k] is template[k] for k in task_keys("b"))  # a group without replies keeps its tensors


def test_a_strategy_without_maths_is_refused_at_construction() -> None:
    class NoMaths(AdapterStrategy):
        pass

    with pytest.raises(TypeError, match="NoMaths sets no aggregator and overrides no aggregate_states"):
        NoMaths()
