"""Quantised bases: 8-bit loading, and gradient checkpointing over a 4- or 8-bit base (on CPU)."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch

from fedlora import runtime
from fedlora.config import ConfigError, from_run_config


def run_config(tiny_llama: Path, **extra: object) -> dict:
    return {
        "model.name": str(tiny_llama),
        "data.source": "chatterbot",
        "data.max-examples": 200,
        "adapter.dropout": 0.0,  # the same forward twice
        "adapter.target-modules": "q_proj,v_proj,o_proj",
        **extra,
    }


def loss_and_grads(bench: runtime.Workbench, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    """One forward and backward pass in training mode: the loss and every LoRA B gradient (A's are 0 while B is)."""
    bench.model.train()
    bench.model.zero_grad(set_to_none=True)
    loss = bench.model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in bench.model.named_parameters() if "lora_B" in n}
    bench.model.zero_grad(set_to_none=True)
    return loss.item(), grads


def first_batch(cfg_overrides: dict) -> dict:
    cfg = from_run_config(cfg_overrides)
    train, _ = runtime.client_sets(cfg, 0, 3)
    return next(iter(runtime.workbench(cfg, reuse=False).loader(train, 4, seed=0)))


@pytest.mark.slow
def test_an_8bit_base_trains_close_to_the_float32_one(tiny_llama: Path) -> None:
    batch = first_batch(run_config(tiny_llama))
    full = runtime.workbench(from_run_config(run_config(tiny_llama)), reuse=False)
    full_loss, full_grads = loss_and_grads(full, batch)
    int8 = runtime.workbench(from_run_config(run_config(tiny_llama, **{"model.load-in-8bit": True})), reuse=False)
    layers = [m for m in int8.model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(layers) == 2 * 7  # every linear layer of the 2 blocks; the tied lm_head stays float
    loss, grads = loss_and_grads(int8, batch)
    assert loss == pytest.approx(full_loss, rel=0.02)  # int8 rounding of the weights, nothing more
    assert grads.keys() == full_grads.keys()
    for name, grad in grads.items():
        assert float(grad.norm()) > 0
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), full_grads[name].flatten(), dim=0)
        assert cosine > 0.95, name


def test_8bit_loading_does_not_apply_to_qlora() -> None:
    with pytest.raises(ConfigError, match=r"'model.load-in-8bit' does not apply to adapter.method='qlora'"):
        from_run_config({"adapter.method": "qlora", "model.load-in-8bit": True})


@pytest.mark.slow
@pytest.mark.parametrize(
    "quantised", [{"adapter.method": "qlora"}, {"model.load-in-8bit": True}], ids=["qlora-nf4", "lora-int8"]
)
def test_gradient_checkpointing_over_a_quantised_base_gives_the_same_gradients(
    tiny_llama: Path, quantised: dict
) -> None:
    batch = first_batch(run_config(tiny_llama))
    plain = runtime.workbench(from_run_config(run_config(tiny_llama, **quantised)), reuse=False)
    plain_loss, plain_grads = loss_and_grads(plain, batch)
    overrides = run_config(tiny_llama, **quantised, **{"train.gradient-checkpointing": True})
    checkpointed = runtime.workbench(from_run_config(overrides), reuse=False)
    assert checkpointed.model.get_base_model().model.gradient_checkpointing
    assert not plain.model.get_base_model().model.gradient_checkpointing
    loss, grads = loss_and_grads(checkpointed, batch)
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    for name, grad in plain_grads.items():
        assert float(grad.norm()) > 0
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6)
