"""Delta-LoRA: the client's base moves by λ·s·Δ(BA) and comes back; the server's residual is the clients' mean base."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedlora import runtime
from fedlora.adapter import adapter_state, load_adapter_state
from fedlora.config import ConfigError, from_run_config
from fedlora.keys import RESIDUAL_A, RESIDUAL_B, lora_pairs, module_of, trained_part
from fedlora.training import make_optimizer, train_steps
from strategies import DeltaLoRA, FedAvgFactors


def delta_config(tiny_llama: Path, **extra: object) -> dict:
    return {
        "model.name": str(tiny_llama),
        "data.source": "chatterbot",
        "data.test-size": 20,
        "data.max-examples": 200,
        "adapter.method": "delta-lora",
        "strategy.name": "delta-lora",
        "adapter.target-modules": "q_proj,v_proj",
        "adapter.dropout": 0.0,
        "deltalora.update-ratio": 2.0,
        **extra,
    }


def with_residual(state: dict[str, torch.Tensor], rank: int, seed: int) -> dict[str, torch.Tensor]:
    """``state`` plus a random residual of ``rank`` on every LoRA layer."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(state)
    for a_key, b_key in lora_pairs(state).values():
        module = module_of(a_key)
        out[module + RESIDUAL_B] = torch.randn(state[b_key].shape[0], rank, generator=gen) * 0.1
        out[module + RESIDUAL_A] = torch.randn(rank, state[a_key].shape[1], generator=gen) * 0.1
    return out


@pytest.mark.slow
def test_local_steps_move_the_base_by_the_product_change_and_the_next_load_undoes_it(tiny_llama: Path) -> None:
    cfg = from_run_config(delta_config(tiny_llama))
    bench = runtime.workbench(cfg)
    model = bench.model
    bases = {
        module_of(a): model.get_submodule(module_of(a)).base_layer.weight for a, _ in lora_pairs(bench.initial).values()
    }
    plain = {m: w.detach().clone() for m, w in bases.items()}
    sent = with_residual(bench.initial, 2, 0)
    load_adapter_state(model, sent)
    train, _ = runtime.client_sets(cfg, 0, 3)
    rate = cfg.deltalora.update_ratio * cfg.adapter.alpha / cfg.adapter.r
    hook = bench.method.step_hook(model, cfg, 1)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg.train, 0.01)
    train_steps(model, bench.loader(train, 4, seed=0), 3, optimizer, 1.0, hook)
    trained = adapter_state(model)
    for a_key, b_key in lora_pairs(trained).values():
        module = module_of(a_key)
        residual = sent[module + RESIDUAL_B] @ sent[module + RESIDUAL_A]
        delta = rate * (trained[b_key] @ trained[a_key] - sent[b_key] @ sent[a_key])
        assert float(delta.norm()) > 0
        torch.testing.assert_close(bases[module], plain[module] + residual + delta, atol=1e-5, rtol=1e-5)
    load_adapter_state(model, bench.initial)  # the next client: no residual, so the plain base again
    for module, weight in bases.items():
        torch.testing.assert_close(weight, plain[module], atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("flower_identity")
def test_server_residual_is_the_mean_of_the_clients_bases(tiny_llama: Path) -> None:
    cfg = from_run_config(delta_config(tiny_llama))
    global_state = with_residual(adapter_state(runtime.workbench(cfg).model), 3, 1)
    sent = trained_part(global_state)
    gen = torch.Generator().manual_seed(2)
    states = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in sent.items()} for _ in range(3)]
    weights = [1.0, 2.0, 5.0]
    strategy = DeltaLoRA(**DeltaLoRA.options(cfg))
    strategy.global_state = global_state
    merged = strategy.aggregate_states(1, states, weights)
    rate = cfg.deltalora.update_ratio * cfg.adapter.alpha / cfg.adapter.r
    factors = FedAvgFactors()
    factors.global_state = sent
    averaged = factors.aggregate_states(1, states, weights)
    for key in sent:  # strategy.within (fedavg-factors) for the LoRA factors
        torch.testing.assert_close(merged[key], averaged[key])
    for a_key, b_key in lora_pairs(sent).values():
        module = module_of(a_key)
        old = global_state[module + RESIDUAL_B] @ global_state[module + RESIDUAL_A]
        client_bases = [old + rate * (s[b_key] @ s[a_key] - sent[b_key] @ sent[a_key]) for s in states]
        mean_base = sum(w / 8 * base for w, base in zip(weights, client_bases, strict=True))
        torch.testing.assert_close(
            merged[module + RESIDUAL_B] @ merged[module + RESIDUAL_A], mean_base, atol=1e-5, rtol=1e-4
        )
        assert merged[module + RESIDUAL_A].shape[0] <= 3 + 4 * cfg.adapter.r  # compacted to its numerical rank


@pytest.mark.parametrize(
    "override, message",
    [
        ({"strategy.name": "fedavg-factors"}, r"'strategy\.name'='fedavg-factors' does not apply to .*'delta-lora'"),
        ({"adapter.method": "lora"}, r"'strategy\.name'='delta-lora' applies only to adapter\.method='delta-lora'"),
        ({"deltalora.update-ratio": -1.0}, r"deltalora\.update-ratio=-1\.0"),
    ],
)
def test_delta_lora_needs_its_strategy_and_a_sane_ratio(override: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_run_config({"adapter.method": "delta-lora", "strategy.name": "delta-lora", **override})


def test_update_ratio_is_refused_for_other_methods() -> None:
    with pytest.raises(ConfigError, match=r"'deltalora\.update-ratio' does not apply to adapter\.method='lora'"):
        from_run_config({"deltalora.update-ratio": 1.0})
