"""Task metrics: exact match of greedy answers, and the central evaluation that reports it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import GenerationConfig

from fedlora import central, runtime
from fedlora.adapter import adapter_state, load_adapter_state
from fedlora.config import ConfigError, from_run_config
from fedlora.generate import generate
from fedlora.task_metrics import exact_match, greedy_exact_match, normalise_answer

PROMPTS = ["Hi", "What is the capital of France, and why is it there?", "Name a colour.", "2 + 2 ="]


def test_answers_are_compared_after_normalisation() -> None:
    assert normalise_answer("  The Cat,  sat. ") == "cat sat"
    assert exact_match(["The Cat.", "dog"], ["cat", "a dog!"]) == 1.0
    assert exact_match(["cat", "dog"], ["cat", "cow"]) == 0.5
    with pytest.raises(ValueError, match="as many answers as references"):
        exact_match(["cat"], ["cat", "dog"])


def test_exact_match_is_one_on_the_models_own_greedy_answers(tiny_llama: Path) -> None:
    bench = runtime.workbench(from_run_config({"model.name": str(tiny_llama)}), reuse=False)
    torch.manual_seed(0)  # a random adapter: the tiny base alone answers with special tokens only
    load_adapter_state(bench.model, {k: torch.randn_like(v) for k, v in bench.initial.items()})
    config = GenerationConfig(max_new_tokens=6, do_sample=False)
    bench.model.eval()
    own = generate(bench.model, bench.tokenizer, PROMPTS, config, batch_size=1)  # one at a time: no padding
    assert all(own)
    rows = Dataset.from_dict({"prompt": PROMPTS, "response": own})
    assert greedy_exact_match(bench.model, bench.tokenizer, rows, 6, batch_size=3) == 1.0  # padded batches
    assert bench.tokenizer.padding_side == "right"  # as training pads, whatever generation did meanwhile
    other = Dataset.from_dict({"prompt": PROMPTS, "response": [*own[:-1], own[-1] + " and more"]})
    assert greedy_exact_match(bench.model, bench.tokenizer, other, 6, batch_size=3) == 0.75


def test_central_evaluation_reports_exact_match_when_asked(tiny_llama: Path) -> None:
    overrides = {"model.name": str(tiny_llama), "data.max-examples": 100, "data.test-size": 8}
    loss_only = from_run_config(overrides)
    cfg = from_run_config({**overrides, "eval.metric": "exact-match", "eval.generate-examples": 3})
    bench = runtime.workbench(cfg, reuse=False)
    state = adapter_state(bench.model)
    metrics = central.evaluate_tasks(bench, cfg, state)[""]
    assert 0.0 <= metrics["eval-exact-match"] <= 1.0 and metrics["num-examples"] == 8
    plain = central.evaluate_tasks(bench, loss_only, state)[""]
    assert "eval-exact-match" not in plain and plain["eval-loss"] == pytest.approx(metrics["eval-loss"], rel=1e-6)


def test_exact_match_needs_a_causal_lm_and_bounds() -> None:
    with pytest.raises(ConfigError, match=r"eval.metric='exact-match' generates answers, so it needs a causal LM"):
        central.check_metric(from_run_config({"model.name": "minilm", "eval.metric": "exact-match"}))
    central.check_metric(from_run_config({"eval.metric": "exact-match"}))  # smollm2: a causal LM
    with pytest.raises(ConfigError, match=r"out of range: eval.generate-examples=0"):
        from_run_config({"eval.generate-examples": 0})
