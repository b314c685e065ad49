"""LongLoRA: S²-Attn is full attention for one group, attends only within groups otherwise, and trains the model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fedlora import runtime
from fedlora.adapter import adapter_state
from fedlora.config import from_run_config
from fedlora.keys import HEAD_COPY
from fedlora.methods.longlora import group_order, shifted_sparse_attention


def full_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    return nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=allowed).transpose(1, 2)


def qkv(length: int, heads: int = 4, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, heads, length, 8, generator=gen) for _ in range(3)]


def causal(length: int) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool).tril()[None, None].expand(2, 1, length, length)


@pytest.mark.parametrize("length", [16, 13])
def test_one_group_as_long_as_the_sequence_is_full_attention(length: int) -> None:
    query, key, value = qkv(length)
    allowed = causal(length).clone()
    allowed[1, :, :, 10:] = False  # the second row is padded after 10 tokens
    allowed[1, :, 10:, :] = False
    out = shifted_sparse_attention(query, key, value, allowed, group=length, scaling=8**-0.5)
    expected = full_attention(query, key, value, allowed)
    torch.testing.assert_close(out[0], expected[0])
    torch.testing.assert_close(out[1, :10], expected[1, :10])  # the padded queries' outputs are never used


def test_one_group_under_a_causal_mask_alone_is_full_attention() -> None:
    query, key, value = qkv(16)
    out = shifted_sparse_attention(query, key, value, None, group=16, scaling=8**-0.5)
    torch.testing.assert_close(out, full_attention(query, key, value, causal(16)))


@pytest.mark.parametrize("mask", ["explicit", "causal-alone"])
def test_groups_attend_within_themselves_half_the_heads_shifted(mask: str) -> None:
    length, group = 16, 4
    query, key, value = qkv(length)
    allowed = causal(length) if mask == "explicit" else None
    out = shifted_sparse_attention(query, key, value, allowed, group=group, scaling=8**-0.5)
    order = group_order(length, 4, group)
    assert torch.equal(order[0], torch.arange(16)) and torch.equal(order[3][:4], torch.tensor([2, 3, 4, 5]))
    for head in range(4):
        for block in order[head].view(-1, group):  # each group alone, causal by original position
            allowed = block[None, :] <= block[:, None]
            sub = [t[:, head : head + 1, block] for t in (query, key, value)]
            expected = full_attention(*sub, allowed[None, None].expand(2, 1, group, group))
            torch.testing.assert_close(out[:, block, head : head + 1], expected)
    assert not torch.allclose(out, full_attention(query, key, value, causal(length)))


def test_longlora_trains_lora_embeddings_and_norms_with_grouped_attention(tiny_llama: Path) -> None:
    cfg = from_run_config(
        {
            "model.name": str(tiny_llama),
            "data.source": "chatterbot",
            "data.test-size": 20,
            "data.max-examples": 200,
            "adapter.method": "longlora",
            "longlora.group-size": 8,
        }
    )
    bench = runtime.workbench(cfg)
    state = adapter_state(bench.model)
    copies = {k.split(HEAD_COPY)[0].rsplit(".", 1)[-1] for k in state if HEAD_COPY in k}
    assert copies == {"embed_tokens", "input_layernorm", "post_attention_layernorm", "norm"}
    train, _ = runtime.client_sets(cfg, 0, 3)
    batch = next(iter(bench.loader(train, 4, seed=0)))
    assert batch["input_ids"].shape[1] > 8  # longer than a group: S²-Attn is on
    bench.model.train()
    grouped = bench.model(**batch).loss
    bench.model.eval()
    with torch.no_grad():
        full = bench.model(**batch).loss  # full attention at inference
    assert not torch.isclose(grouped, full)
    bench.model.zero_grad(set_to_none=True)
    bench.model.train()
    grouped.backward()
    assert all(p.grad is not None for p in bench.model.parameters() if p.requires_grad)


def test_longlora_is_refused_for_a_classifier() -> None:
    with pytest.raises(ValueError, match=r"adapter\.method='longlora' trains causal LMs"):
        runtime.workbench(from_run_config({"model.name": "minilm", "adapter.method": "longlora"}))
