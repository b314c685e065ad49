"""Helpers for end-to-end tests: run fedlora through `flwr run` and check what it left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file

from fedlora import runtime
from fedlora.config import from_run_config
from fedlora.models import CLASSIFICATION, model_dir, resolve_task
from fedlora.training import evaluate
from simulations.inprocess import run_in_process
from simulations.run import flwr_run, run_config_arg

# A short run of the tiny Llama on chatterbot in which every method's loss falls.
TINY_RUN = {
    "data.source": "chatterbot",
    "data.test-size": 60,
    "data.max-examples": 600,
    "num-server-rounds": 2,
    "train.local-steps": 8,
    "train.lr": 0.01,
    "train.lr-min": 0.005,
}


def simulate(tmp_path: Path, overrides: dict, clients: int = 3, in_process: bool = False) -> tuple[dict, list[dict]]:
    """Run a simulation with ``overrides``; return them (with output-dir) and metrics.json's rounds.

    ``in_process`` runs the same apps without a SuperLink or Ray (:mod:`simulations.inprocess`): for checks of
    what a method or strategy learns, where the `flwr run` machinery, already covered elsewhere, only adds time.
    """
    overrides = {**overrides, "output-dir": str(tmp_path / "out")}
    if in_process:
        return overrides, run_in_process(overrides, clients)
    result = flwr_run(run_config_arg(overrides), clients, flwr_home=tmp_path / "flwr", timeout=600, capture=True)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    metrics_file = tmp_path / "out" / "metrics.json"
    assert metrics_file.is_file(), log[-3000:]
    return overrides, json.loads(metrics_file.read_text())["rounds"]


def check_run(overrides: dict, rounds: list[dict], metric: str, cohorts: bool = False) -> None:
    """Loss went down, the adapter moved, and peft reloads it to the server's last evaluation.

    With ``cohorts``, a message carries one adapter for several clients, so downloads may be below uploads.
    """
    cfg = from_run_config(overrides)
    assert [r["round"] for r in rounds] == list(range(cfg.run.num_server_rounds + 1))
    first, last = rounds[0]["server-eval"], rounds[-1]["server-eval"]
    assert last["eval-loss"] < first["eval-loss"] - 0.005, rounds
    for entry in rounds[1:]:
        assert entry["train"]["train-loss"] > 0 and entry["client-eval"]["eval-loss"] > 0
        assert entry["bytes-up"] > 0 and entry["bytes-down"] > (0 if cohorts else entry["bytes-up"])  # train + eval
        assert entry.get("excluded-replies", 0) == 0

    bench = runtime.workbench(cfg, reuse=False)  # a fresh model: the run's initial adapter (in process too)
    folder = Path(overrides["output-dir"]) / "adapter"
    initial = get_peft_model_state_dict(bench.model)
    final = load_file(folder / "adapter_model.safetensors")
    assert final.keys() == initial.keys()
    assert any(not torch.equal(final[k], initial[k].cpu()) for k in final), "the global adapter did not change"

    task = resolve_task(cfg.model.name, cfg.model.task)
    num_labels = bench.model.config.num_labels if task == CLASSIFICATION else 0
    base = bench.method.load_base(model_dir(cfg.model.name), task, num_labels, cfg)
    loaded = PeftModel.from_pretrained(base, folder)
    reproduced = evaluate(loaded, bench.loader(runtime.test_set(cfg), cfg.eval.batch_size), task)
    assert reproduced["eval-loss"] == pytest.approx(last["eval-loss"], abs=1e-5)
    assert reproduced[metric] == pytest.approx(last[metric], rel=1e-5)
