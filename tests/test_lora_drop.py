"""LoRA-drop: the importance a client measures, the server's choice, and what trains and travels after the drop."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import reply
from e2e import check_run, simulate
from flwr.app import ConfigRecord, Message
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from test_strategies import FakeGrid

from fedlora import runtime
from fedlora.adapter import adapter_state
from fedlora.config import ConfigError, from_run_config
from fedlora.keys import ARRAYS, LAYER_IMPORTANCE, TRAINABLE_LAYERS, is_lora_a, is_lora_b, module_of
from fedlora.layer_importance import choose_layers, drop_layers, layers_state, lora_layers, mean_importance, normalised
from fedlora.methods import get_method
from fedlora.wire import from_record, to_record
from strategies import FedAvgFactors, FedAvgProducts, LoRADrop, build_strategy

D, K, R = 12, 10, 2


def drop_config(tiny_llama: Path, **extra: object) -> dict:
    return {
        "model.name": str(tiny_llama),
        "data.source": "chatterbot",
        "data.test-size": 30,
        "data.max-examples": 600,
        "adapter.method": "lora-drop",
        "strategy.name": "lora-drop",
        "adapter.target-modules": "q_proj,v_proj,o_proj",
        **extra,
    }


# --- The server's choice, on numbers ----------------------------------------------------------------------------


def test_threshold_keeps_the_fewest_layers_reaching_the_share_and_top_n_the_n_largest() -> None:
    importance = {"a": 1.0, "b": 6.0, "c": 0.5, "d": 2.5}  # shares 0.1, 0.6, 0.05, 0.25
    assert normalised(importance) == pytest.approx({"a": 0.1, "b": 0.6, "c": 0.05, "d": 0.25})
    assert choose_layers(importance, 0.6) == ["b"]
    assert choose_layers(importance, 0.61) == ["b", "d"]
    assert choose_layers(importance, 0.9) == ["b", "d", "a"]
    assert choose_layers(importance, 1.0) == ["b", "d", "a", "c"]
    assert choose_layers(importance, 0.9, top_n=1) == ["b"]
    assert choose_layers({"y": 1.0, "x": 1.0, "z": 0.0}, 0.5) == ["x"]  # a tie goes to the name, on every party
    assert choose_layers({"x": 0.0, "y": 0.0}, 0.5) == ["x"]  # nothing to tell apart: equal shares
    with pytest.raises(ValueError, match="threshold"):
        choose_layers(importance, 0.0)


def test_the_clients_reports_are_averaged_by_their_weights() -> None:
    reports = [{"a": 9.0, "b": 1.0}, {"a": 1.0, "b": 1.0}]
    assert mean_importance(reports, [1.0, 3.0]) == pytest.approx({"a": 3.0, "b": 1.0})


def test_a_drop_zeroes_the_dropped_layers_and_keeps_every_other_tensor() -> None:
    state = {
        "m.q.lora_A.weight": torch.ones(R, K),
        "m.q.lora_B.weight": torch.ones(D, R),
        "m.v.lora_A.weight": torch.ones(R, K),
        "m.v.lora_B.weight": torch.ones(D, R),
        "head.weight": torch.ones(3, K),
    }
    assert lora_layers(state) == ["m.q", "m.v"]
    assert set(layers_state(state, ["m.q"])) == {"m.q.lora_A.weight", "m.q.lora_B.weight", "head.weight"}
    dropped = drop_layers(state, ["m.q"])
    assert dropped.keys() == state.keys()
    assert all(float(dropped[k].abs().sum()) == 0 for k in state if k.startswith("m.v"))
    assert all(torch.equal(dropped[k], state[k]) for k in state if not k.startswith("m.v"))


# --- The strategy, on synthetic messages -------------------------------------------------------------------------


def two_layer_state(seed: int) -> dict[str, np.ndarray]:
    gen = np.random.default_rng(seed)
    state = {f"m.{x}.lora_{f}.weight": gen.standard_normal(s).astype(np.float32)
             for x in "qv" for f, s in (("A", (R, K)), ("B", (D, R)))}  # fmt: skip
    return {**state, "head.weight": gen.standard_normal((3, K)).astype(np.float32)}


def with_report(message: Message, report: dict[str, float]) -> Message:
    message.content[LAYER_IMPORTANCE] = ConfigRecord(report)
    return message


@pytest.mark.usefixtures("flower_identity")
@pytest.mark.parametrize("within", [FedAvgFactors, FedAvgProducts])
def test_the_server_chooses_from_the_weighted_reports_then_sends_and_accepts_only_the_kept_layers(
    within: type,
) -> None:
    name = "fedavg-products" if within is FedAvgProducts else "fedavg-factors"
    strategy = LoRADrop(threshold=0.7, within=name, min_train_nodes=1, min_available_nodes=1)
    grid = FakeGrid([11, 12])
    initial = to_record({k: torch.from_numpy(v) for k, v in two_layer_state(0).items()})
    config = ConfigRecord()
    sent = strategy.configure_train(1, initial, config, grid)
    assert config[LAYER_IMPORTANCE] is True and TRAINABLE_LAYERS not in config
    assert all(set(from_record(m.content[ARRAYS])) == set(two_layer_state(0)) for m in sent)

    states = [two_layer_state(1), two_layer_state(2)]
    replies = [
        with_report(reply(11, states[0], 1), {"m.q": 9.0, "m.v": 1.0}),
        with_report(reply(12, states[1], 3), {"m.q": 1.0, "m.v": 1.0}),
        reply(13, states[1], 3),  # no report in a round that asked for one
    ]
    strategy.sent[13] = strategy.sent[12]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["excluded-replies"] == 1
    assert strategy.kept == ["m.q"]  # mean importance q 3, v 1: q's share 0.75 reaches 0.7
    assert strategy.round_log[1]["lora-drop-importance"] == pytest.approx({"m.q": 0.75, "m.v": 0.25})
    after_drop = from_record(arrays)
    assert set(after_drop) == set(two_layer_state(0))  # the global adapter keeps every layer ...
    assert all(float(after_drop[k].abs().sum()) == 0 for k in after_drop if k.startswith("m.v"))  # ... v zeroed
    expected = 0.25 * states[0]["head.weight"] + 0.75 * states[1]["head.weight"]
    np.testing.assert_allclose(after_drop["head.weight"].numpy(), expected, rtol=1e-5)

    config = ConfigRecord()
    sent = strategy.configure_train(2, arrays, config, grid)
    assert config[TRAINABLE_LAYERS] == ["m.q"] and config[LAYER_IMPORTANCE] is False
    kept_keys = {"m.q.lora_A.weight", "m.q.lora_B.weight", "head.weight"}
    assert all(set(from_record(m.content[ARRAYS])) == kept_keys for m in sent)
    assert strategy.round_log[2]["trained-layers"] == 1

    narrowed = [{k: v for k, v in s.items() if k in kept_keys} for s in (two_layer_state(3), two_layer_state(4))]
    strategy.sent[13] = strategy.sent[12]
    arrays, metrics = strategy.aggregate_train(
        2, [reply(11, narrowed[0], 1), reply(12, narrowed[1], 3), reply(13, two_layer_state(5), 3)]
    )
    assert metrics["excluded-replies"] == 1  # node 13 sent the dropped layer too
    out = from_record(arrays)
    assert set(out) == set(two_layer_state(0))
    assert all(float(out[k].abs().sum()) == 0 for k in out if k.startswith("m.v"))
    assert metrics["bytes-down"] < strategy.round_log[1]["bytes-down"]
    reference = within(min_train_nodes=1, min_available_nodes=1)  # the kept layer, as `within` aggregates it
    reference.configure_train(2, to_record(layers_state(after_drop, ["m.q"])), ConfigRecord(), grid)
    expected = from_record(reference.aggregate_train(2, [reply(11, narrowed[0], 1), reply(12, narrowed[1], 3)])[0])
    for key in kept_keys:
        torch.testing.assert_close(out[key], expected[key])

    resumed = LoRADrop(threshold=0.7, min_train_nodes=1, min_available_nodes=1)  # a resumed run's strategy
    resumed.round_log.update(json.loads(json.dumps(strategy.round_log)))  # as the checkpoint keeps it
    assert resumed.kept == ["m.q"]


@pytest.mark.usefixtures("flower_identity")
def test_a_report_that_does_not_name_exactly_the_layers_or_is_not_a_count_is_excluded() -> None:
    strategy = LoRADrop(min_train_nodes=1, min_available_nodes=1)
    initial = to_record({k: torch.from_numpy(v) for k, v in two_layer_state(0).items()})
    strategy.configure_train(1, initial, ConfigRecord(), FakeGrid([11, 12, 13]))
    replies = [
        with_report(reply(11, two_layer_state(1)), {"m.q": 1.0}),
        with_report(reply(12, two_layer_state(1)), {"m.q": 1.0, "m.v": float("nan")}),
        with_report(reply(13, two_layer_state(1)), {"m.q": 1.0, "m.v": -1.0}),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is None and strategy.kept is None  # no choice made: the next round asks again
    assert strategy.round_log[1]["excluded-replies"] == 3


def test_lora_drop_needs_its_strategy_and_refuses_what_does_not_apply(tiny_llama: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape("strategy.name='lora-drop'")):
        from_run_config({**drop_config(tiny_llama), "strategy.name": "fedavg-factors"})
    with pytest.raises(ConfigError, match=re.escape("loradrop.threshold")):
        from_run_config({**drop_config(tiny_llama), "loradrop.threshold": 1.5})
    with pytest.raises(ConfigError, match=re.escape("loradrop.warmup-rounds")):
        from_run_config({**drop_config(tiny_llama), "loradrop.warmup-rounds": 4, "num-server-rounds": 3})
    with pytest.raises(ConfigError, match=re.escape("does not apply to adapter.method='lora'")):
        from_run_config({"loradrop.keep-layers": 2})
    with pytest.raises(ConfigError, match=re.escape("cohort.clients")):
        build_strategy(from_run_config({**drop_config(tiny_llama), "cohort.clients": 8}))
    with pytest.raises(ConfigError, match="importance report"):
        build_strategy(from_run_config({**drop_config(tiny_llama), "secagg.enabled": True}))
    with pytest.raises(ConfigError, match="server-optimizer"):
        build_strategy(from_run_config({**drop_config(tiny_llama), "strategy.server-optimizer": "avgm"}))


# --- The client's side, on the tiny Llama --------------------------------------------------------------------------


def test_importance_is_the_mean_squared_lora_output_over_the_tokens(tiny_llama: Path) -> None:
    bench = runtime.workbench(from_run_config(drop_config(tiny_llama)))
    model = bench.model
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_lora_b(name):  # B starts at zero: give every layer an output
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    batches = [
        {"input_ids": torch.randint(0, 1000, (2, 7), generator=gen), "attention_mask": torch.ones(2, 7)},
        {"input_ids": torch.randint(0, 1000, (3, 5), generator=gen), "attention_mask": torch.ones(3, 5)},
    ]
    batches[1]["attention_mask"][0, 3:] = 0  # padding does not count
    measured = bench.method.layer_importance(model, batches)

    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    handles = [m.register_forward_pre_hook(lambda _, args, n=n: inputs[n].append(args[0])) for n, m in layers.items()]
    model.eval()
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for handle in handles:
        handle.remove()
    tokens = sum(float(b["attention_mask"].sum()) for b in batches)
    assert set(measured) == set(layers) == set(lora_layers(adapter_state(model)))
    for name, layer in layers.items():
        a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
        by_hand = sum(
            float(((s * x @ a.detach().T @ b.detach().T) ** 2).sum(-1).mul(batch["attention_mask"]).sum())
            for x, batch in zip(inputs[name], batches, strict=True)
        )
        assert measured[name] == pytest.approx(by_hand / tokens, rel=1e-4)
        assert measured[name] > 0


def test_after_the_drop_the_message_holds_exactly_the_kept_layers_trainable_tensors(tiny_llama: Path) -> None:
    bench = runtime.workbench(from_run_config(drop_config(tiny_llama)))
    model, method = bench.model, bench.method
    layers = lora_layers(bench.initial)
    kept = layers[:2]
    method.train_layers(model, kept)
    try:
        message = from_record(to_record(adapter_state(model)))
        params = dict(model.named_parameters())
        assert (
            set(message) == {n for n, p in params.items() if p.requires_grad} == set(layers_state(bench.initial, kept))
        )
        assert {module_of(k) for k in message} == set(kept)
        dropped = [p for n, p in params.items() if (is_lora_a(n) or is_lora_b(n)) and module_of(n) not in kept]
        assert dropped and all(not p.requires_grad and float(p.abs().sum()) == 0 for p in dropped)
        with pytest.raises(ValueError, match="modules without LoRA"):
            method.train_layers(model, [*kept, "base_model.model.lm_head"])
    finally:
        method.train_layers(model, None)
    assert set(adapter_state(model)) == set(bench.initial)  # every layer trains again
    with pytest.raises(ValueError, match="trains every layer"):
        get_method("lora").train_layers(model, kept)


# --- End to end, in process ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lora_drop_federates_drops_layers_from_the_wire_and_reloads(tmp_path: Path, tiny_llama: Path) -> None:
    extra = {"num-server-rounds": 2, "train.local-steps": 8, "train.lr": 0.01, "train.lr-min": 0.005}
    overrides, rounds = simulate(tmp_path, drop_config(tiny_llama, **extra, **{"loradrop.keep-layers": 2}), 2, True)
    check_run(overrides, rounds, "eval-perplexity")  # the loss falls, peft reloads the server's last evaluation
    kept = rounds[1]["lora-drop-kept"]
    assert len(kept) == 2 and len(rounds[1]["lora-drop-importance"]) == 6
    assert rounds[2]["trained-layers"] == 2
    assert rounds[2]["bytes-up"] < rounds[1]["bytes-up"] / 2  # 2 of 6 layers travel up after the drop
    saved = load_file(Path(overrides["output-dir"]) / "adapter" / "adapter_model.safetensors")
    assert len(lora_layers(saved)) == 6  # every layer saved, the dropped ones zero
    dropped = [t for k, t in saved.items() if module_of(k) not in kept]
    assert len(dropped) == 2 * 4 and all(float(t.abs().sum()) == 0 for t in dropped)
