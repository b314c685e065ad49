"""LISA: the server's layer plan, what travels, a cached worker kept in sync, and a federated run that reloads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from e2e import simulate
from transformers import AutoModelForCausalLM

from fedlora import runtime
from fedlora.adapter import adapter_state, load_adapter_state, trainable_names
from fedlora.centralised import run_centralised
from fedlora.config import ConfigError, from_run_config
from fedlora.keys import frozen_key, is_frozen, layer_of
from fedlora.layerwise import layers_trained_before, num_layers, round_message, sample_layers
from fedlora.methods import load_saved
from fedlora.models import CAUSAL_LM, load_base_model, model_dir
from fedlora.selection import select
from fedlora.training import evaluate
from fedlora.validation import InvalidUpdate
from strategies import LISA, build_strategy


def lisa_config(tiny_llama: Path, **extra: object) -> dict:
    return {
        "model.name": str(tiny_llama),
        "data.source": "chatterbot",
        "data.test-size": 20,
        "data.max-examples": 300,
        "adapter.method": "lisa",
        "strategy.name": "lisa",
        "lisa.layers": 1,
        **extra,
    }


def test_sampling_is_deterministic_per_period_and_covers_every_layer() -> None:
    rounds = [sample_layers(7, r, 30, 2) for r in range(1, 201)]
    assert rounds == [sample_layers(7, r, 30, 2) for r in range(1, 201)]  # what a resumed server recomputes
    assert all(len(set(layers)) == 2 and all(0 <= i < 30 for i in layers) for layers in rounds)
    assert {i for layers in rounds for i in layers} == set(range(30))
    assert len({tuple(layers) for layers in rounds}) > 100  # a new draw every round, not a fixed few
    assert rounds != [sample_layers(8, r, 30, 2) for r in range(1, 201)]  # the seed decides
    periodic = [sample_layers(7, r, 30, 2, period=3) for r in range(1, 10)]
    assert periodic[0] == periodic[1] == periodic[2] != periodic[3] == periodic[4] == periodic[5]
    assert layers_trained_before(7, 4, 30, 2) == set(rounds[0] + rounds[1] + rounds[2])
    with pytest.raises(ValueError, match="cannot sample 3 of 2 layers"):
        sample_layers(0, 1, 2, 3)


def test_message_keys_are_the_trainable_parameters_sampled_layers_embeddings_and_head(tiny_llama: Path) -> None:
    cfg = from_run_config(lisa_config(tiny_llama))
    bench = runtime.workbench(cfg)
    params = dict(bench.model.named_parameters())
    assert set(bench.initial) == set(params) and num_layers(bench.initial) == 2  # the server's state: everything
    assert "lm_head.weight" not in params  # tied to the embeddings: one tensor, sent once
    message = round_message(bench.initial, {1}, {0, 1})
    trained = {k for k in message if not is_frozen(k)}
    assert trained == {k for k in params if layer_of(k) in (None, 1)}
    assert {k for k in trained if layer_of(k) is None} == {"model.embed_tokens.weight", "model.norm.weight"}
    assert {k for k in message if is_frozen(k)} == {frozen_key(k) for k in params if layer_of(k) == 0}
    load_adapter_state(bench.model, message)
    assert set(trainable_names(bench.model)) == trained == set(adapter_state(bench.model))
    assert not round_message(bench.initial, {1}, set()).keys() & {frozen_key(k) for k in params}  # untrained: absent


def test_a_cached_model_becomes_each_message_s_model_whatever_it_served_before(tiny_llama: Path) -> None:
    bench = runtime.workbench(from_run_config(lisa_config(tiny_llama)))
    model, initial = bench.model, bench.initial
    gen = torch.Generator().manual_seed(0)
    moved = {k: v + torch.randn(v.shape, generator=gen) for k, v in initial.items()}  # a later global model
    load_adapter_state(model, round_message(moved, {0}, {0, 1}))  # client A: layer 0 trains, layer 1 frozen
    with torch.no_grad():
        for name in trainable_names(model):
            model.get_parameter(name).add_(1.0)  # A's local training
    select(model, round_message(initial, {1}, set()))  # client B, never sampled before: layer 0 is the base's
    after = dict(model.named_parameters())
    for name, tensor in initial.items():
        if layer_of(name) == 0:
            torch.testing.assert_close(after[name].detach(), tensor, rtol=0, atol=0)
            assert not after[name].requires_grad
        else:
            assert after[name].requires_grad
    load_adapter_state(model, round_message(moved, {1}, {0}))  # client C: layer 0 frozen at the global value
    for name, tensor in dict(model.named_parameters()).items():
        torch.testing.assert_close(tensor.detach(), moved[name], rtol=0, atol=0)


def test_frozen_tensors_are_checked_and_refused_by_a_fixed_model(tiny_llama: Path) -> None:
    bench = runtime.workbench(from_run_config(lisa_config(tiny_llama)))
    name = "model.layers.0.mlp.up_proj.weight"
    bad = {frozen_key(name): torch.full_like(bench.initial[name], float("nan"))}
    with pytest.raises(InvalidUpdate, match=f"frozen tensor '{frozen_key(name)}' contains NaN"):
        select(bench.model, {**round_message(bench.initial, {1}, set()), **bad})
    with pytest.raises(InvalidUpdate, match="sent to a model whose trainable set is fixed"):
        select(torch.nn.Linear(2, 2), {frozen_key("weight"): torch.zeros(2, 2)})


def test_the_server_averages_the_round_s_tensors_into_the_whole_model(tiny_llama: Path) -> None:
    cfg = from_run_config(lisa_config(tiny_llama))
    global_state = runtime.workbench(cfg).initial
    strategy = LISA(**LISA.options(cfg))
    strategy.global_state, strategy.current_round = global_state, 3
    sent = strategy.message_state()
    layers = sample_layers(cfg.run.seed, 3, 2, 1)
    assert {layer_of(k) for k in sent if not is_frozen(k)} == {None, *layers}
    assert {layer_of(k) for k in sent if is_frozen(k)} == layers_trained_before(cfg.run.seed, 3, 2, 1) - set(layers)
    trained = {k: v for k, v in sent.items() if not is_frozen(k)}
    states = [{k: v + c for k, v in trained.items()} for c in (1.0, 4.0)]
    new = strategy.aggregate_states(3, states, [2.0, 1.0])
    assert new.keys() == global_state.keys()
    for name, tensor in global_state.items():
        torch.testing.assert_close(new[name], tensor + 2.0 if name in trained else tensor)
    assert strategy.round_log[3]["lisa-layers"] == layers


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"adapter.r": 4}, "'adapter.r' does not apply to adapter.method='lisa'"),
        ({"wire.dtype": "float16"}, "'wire.dtype' does not apply to adapter.method='lisa'"),
        ({"model.load-in-8bit": True}, "'model.load-in-8bit' does not apply to adapter.method='lisa'"),
        ({"strategy.name": "fedavg-products"}, "'strategy.name'='fedavg-products' does not apply"),
        ({"strategy.server-optimizer": "adam"}, "does not apply to strategy.name='lisa'"),
        ({"adapter.method": "lora", "lisa.layers": 2}, "'strategy.name'='lisa' applies only to adapter.method='lisa'"),
    ],
)
def test_options_that_do_not_apply_are_refused_by_name(tiny_llama: Path, override: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_strategy(from_run_config(lisa_config(tiny_llama, **override)))


def test_more_layers_than_the_model_has_is_refused_by_name(tiny_llama: Path) -> None:
    with pytest.raises(ValueError, match=r"lisa\.layers=3, but the model has 2 decoder layers"):
        runtime.workbench(from_run_config(lisa_config(tiny_llama, **{"lisa.layers": 3})), reuse=False)


def test_the_centralised_baseline_refuses_lisa(tiny_llama: Path) -> None:
    with pytest.raises(ConfigError, match=r"adapter\.method='lisa' trains what the server's strategy chooses"):
        run_centralised(from_run_config(lisa_config(tiny_llama)), 2)


@pytest.mark.slow
def test_lisa_federates_and_its_saved_model_reloads_to_the_last_evaluation(tmp_path: Path, tiny_llama: Path) -> None:
    """Two rounds in process; with seed 0, round 2 trains layer 1 while layer 0, trained in round 1, travels frozen."""
    extra = {"seed": 0, "num-server-rounds": 2, "train.local-steps": 4, "train.lr": 0.001, "train.lr-min": 0.0005}
    overrides, rounds = simulate(tmp_path, lisa_config(tiny_llama, **extra), clients=2, in_process=True)
    assert [r.get("lisa-layers") for r in rounds] == [None, [0], [1]]
    assert rounds[-1]["server-eval"]["eval-loss"] < rounds[0]["server-eval"]["eval-loss"] - 0.005
    assert all(r.get("excluded-replies", 0) == 0 for r in rounds)
    cfg = from_run_config(overrides)
    initial = runtime.workbench(cfg, reuse=False).initial
    payload = 4 * sum(t.numel() for k, t in initial.items() if layer_of(k) in (None, 0))  # float32, round 1
    assert 2 * payload < rounds[1]["bytes-up"] < 2 * payload + 2 * 4096  # two clients, packed: ~2 kB over
    folder = Path(overrides["output-dir"]) / "adapter"
    loaded = load_saved(load_base_model(model_dir(str(tiny_llama)), CAUSAL_LM, 0), folder)
    plain = AutoModelForCausalLM.from_pretrained(folder)  # without fedlora
    assert any(not torch.equal(p.detach(), initial[n]) for n, p in loaded.named_parameters())
    for name, param in plain.named_parameters():
        torch.testing.assert_close(param, loaded.get_parameter(name), rtol=0, atol=0)
    bench = runtime.workbench(cfg)
    reproduced = evaluate(loaded, bench.loader(runtime.test_set(cfg), cfg.eval.batch_size), CAUSAL_LM)
    assert reproduced["eval-loss"] == pytest.approx(rounds[-1]["server-eval"]["eval-loss"], abs=1e-5)
