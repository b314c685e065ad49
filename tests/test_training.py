"""Local training options: gradient accumulation, epochs, and where they cannot apply."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset

from fedlora import runtime
from fedlora.adapter import adapter_state, load_adapter_state
from fedlora.cohort import sequential_reason
from fedlora.config import ConfigError, from_run_config
from fedlora.data.tokenize import tokenize
from fedlora.models import CAUSAL_LM
from fedlora.training import train_steps, trainable_parameters

# Answers of very different lengths: the two halves of a batch of 8 hold unequal numbers of answer tokens.
ROWS = {
    "prompt": [f"Count to {n}." for n in (1, 2, 3, 4, 20, 25, 30, 35, 5, 9)],
    "response": [" ".join(str(i) for i in range(1, n + 1)) for n in (1, 2, 3, 4, 20, 25, 30, 35, 5, 9)],
}


@pytest.fixture
def bench(tiny_llama: Path) -> runtime.Workbench:
    cfg = from_run_config({"model.name": str(tiny_llama), "adapter.dropout": 0.0, "adapter.target-modules": "q_proj"})
    return runtime.workbench(cfg, reuse=False)


def one_step(
    bench: runtime.Workbench, data: Dataset, batch_size: int, accumulation: int, precision: str = "float32"
) -> tuple[float, dict]:
    """The loss and the adapter after one SGD step (lr 1, so the update is minus the gradient) from the initial one."""
    load_adapter_state(bench.model, bench.initial)
    optimizer = torch.optim.SGD(trainable_parameters(bench.model), lr=1.0)
    loss = train_steps(
        bench.model, bench.loader(data, batch_size), 1, optimizer, 0.0, precision=precision, accumulation=accumulation
    )
    return loss, {k: v.clone() for k, v in adapter_state(bench.model).items()}


def test_accumulating_two_batches_of_4_is_one_batch_of_8(bench: runtime.Workbench) -> None:
    data = tokenize(Dataset.from_dict(ROWS), bench.tokenizer, CAUSAL_LM, 128).select(range(8))
    big_loss, big = one_step(bench, data, 8, 1)
    small_loss, small = one_step(bench, data, 4, 2)
    assert small_loss == pytest.approx(big_loss, rel=1e-5)
    for key in big:
        update_big, update_small = big[key] - bench.initial[key], small[key] - bench.initial[key]
        torch.testing.assert_close(update_small, update_big, rtol=1e-5, atol=1e-5 * update_big.abs().max().item())
    # The token weighting matters here: the plain mean of the two micro-batch means is another step.
    load_adapter_state(bench.model, bench.initial)
    optimizer = torch.optim.SGD(trainable_parameters(bench.model), lr=1.0)
    for batch in bench.loader(data, 4):
        (bench.model(**batch).loss / 2).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    naive = adapter_state(bench.model)
    moved = [k for k in big if (big[k] - bench.initial[k]).abs().max() > 0]  # lora_A does not move while B is 0
    errors = [float((naive[k] - big[k]).abs().max() / (big[k] - bench.initial[k]).abs().max()) for k in moved]
    assert moved and max(errors) > 0.01


def test_float16_scales_the_loss_and_unscales_the_step(
    bench: runtime.Workbench, monkeypatch: pytest.MonkeyPatch
) -> None:
    scales: list[float] = []
    scale = torch.amp.GradScaler.scale

    def spy(self: torch.amp.GradScaler, outputs: torch.Tensor) -> torch.Tensor:
        scaled = scale(self, outputs)
        scales.append(float(scaled / outputs))
        return scaled

    monkeypatch.setattr(torch.amp.GradScaler, "scale", spy)
    data = tokenize(Dataset.from_dict(ROWS), bench.tokenizer, CAUSAL_LM, 128).select(range(8))
    full_loss, full = one_step(bench, data, 4, 2)
    assert scales == [1.0, 1.0]  # float32: the scaler passes the loss through
    half_loss, half = one_step(bench, data, 4, 2, precision="float16")
    assert scales[2:] == [65536.0, 65536.0]  # torch's initial scale, once per micro-batch
    assert half_loss == pytest.approx(full_loss, rel=1e-2)
    for key in full:  # the step is float32's up to float16 rounding: the scale was divided out again
        update_full, update_half = full[key] - bench.initial[key], half[key] - bench.initial[key]
        torch.testing.assert_close(update_half, update_full, rtol=0.05, atol=0.05 * update_full.abs().max().item())
    with pytest.raises(
        ConfigError, match=r"'train.precision' is 'float64'; expected one of float32, bfloat16, float16"
    ):
        from_run_config({"train.precision": "float64"})


def test_epochs_pass_over_every_batch_in_steps_of_accumulated_batches(bench: runtime.Workbench) -> None:
    data = tokenize(Dataset.from_dict(ROWS), bench.tokenizer, CAUSAL_LM, 128)  # 10 examples: batches of 4, 4, 2
    steps: list[int] = []
    optimizer = torch.optim.SGD(trainable_parameters(bench.model), lr=0.0)
    train_steps(bench.model, bench.loader(data, 4, seed=0), 99, optimizer, 0.0, steps.append, accumulation=2, epochs=3)
    assert steps == list(range(6))  # per epoch: one step of 2 batches, one of the last batch alone


def test_options_the_batched_cohort_cannot_apply_make_it_sequential(bench: runtime.Workbench) -> None:
    plain = from_run_config({"cohort.clients": 8})
    assert sequential_reason(plain, bench.method, bench.model) == ""
    accumulated = from_run_config({"cohort.clients": 8, "train.grad-accumulation": 2})
    assert "train.grad-accumulation" in sequential_reason(accumulated, bench.method, bench.model)
    by_epochs = from_run_config({"cohort.clients": 8, "train.epochs": 1})
    assert "train.epochs" in sequential_reason(by_epochs, bench.method, bench.model)
    half = from_run_config({"cohort.clients": 8, "train.precision": "float16"})
    assert "train.precision" in sequential_reason(half, bench.method, bench.model)


def test_epochs_do_not_apply_to_adalora_whose_schedule_counts_steps() -> None:
    with pytest.raises(ConfigError, match=r"'train.epochs' does not apply to adapter.method='adalora'"):
        from_run_config({"adapter.method": "adalora", "train.epochs": 1})
    with pytest.raises(ConfigError, match=r"out of range: train.grad-accumulation=0"):
        from_run_config({"train.grad-accumulation": 0})
