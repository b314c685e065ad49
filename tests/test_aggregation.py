"""The aggregation math of fedlora.aggregation, on random tensors against dense references."""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.aggregation import average_states, normalized_weights, product_average, weighted_average
from fedlora.keys import lora_pairs


def random_clients(ranks: list[int], d: int = 24, k: int = 20, seed: int = 0) -> tuple[list, list]:
    gen = torch.Generator().manual_seed(seed)
    bs = [torch.randn(d, r, generator=gen) for r in ranks]
    as_ = [torch.randn(r, k, generator=gen) for r in ranks]
    return bs, as_


def dense_average(bs, as_, weights, scalings=None) -> torch.Tensor:
    p = normalized_weights(weights)
    scalings = scalings or [1.0] * len(bs)
    return sum(pk * sk * (b.double() @ a.double()) for b, a, pk, sk in zip(bs, as_, p, scalings)).float()


@pytest.mark.parametrize("ranks, rank", [([2, 2], 4), ([1, 2, 1], 4), ([2, 4, 8], 14), ([2, 4, 8], 16)])
def test_product_average_is_exact_when_ranks_fit(ranks: list[int], rank: int) -> None:
    bs, as_ = random_clients(ranks)
    weights = [3.0, 1.0, 2.0][: len(ranks)]
    result = product_average(bs, as_, weights, rank)
    assert result.b.shape == (24, rank) and result.a.shape == (rank, 20)
    torch.testing.assert_close(result.b @ result.a, dense_average(bs, as_, weights), atol=1e-5, rtol=1e-5)
    assert result.truncation_error < 1e-6


def test_factor_average_is_not_the_average_of_products() -> None:
    bs, as_ = random_clients([4, 4, 4])
    weights = [1.0, 2.0, 3.0]
    factors = weighted_average(bs, weights) @ weighted_average(as_, weights)
    assert (factors - dense_average(bs, as_, weights)).norm() > 0.1 * dense_average(bs, as_, weights).norm()


def test_truncation_keeps_best_rank_r_and_reports_its_error() -> None:
    bs, as_ = random_clients([4, 4, 4])
    weights = [1.0, 1.0, 2.0]
    dense = dense_average(bs, as_, weights).double()
    u, s, vh = torch.linalg.svd(dense)
    best = (u[:, :4] * s[:4]) @ vh[:4]
    expected_error = math.sqrt(float((s[4:] ** 2).sum() / (s**2).sum()))

    result = product_average(bs, as_, weights, rank=4)

    torch.testing.assert_close((result.b @ result.a).double(), best, atol=1e-5, rtol=1e-5)
    assert result.truncation_error == pytest.approx(expected_error, rel=1e-5)
    assert result.truncation_error > 0.05
    torch.testing.assert_close(result.singular_values.double()[:12], s[:12], atol=1e-4, rtol=1e-4)


def test_scalings_are_applied_per_client_and_divided_out() -> None:
    bs, as_ = random_clients([2, 4])
    weights, scalings = [1.0, 1.0], [8.0, 2.0]
    result = product_average(bs, as_, weights, rank=6, scalings=scalings, out_scaling=4.0)
    expected = dense_average(bs, as_, weights, scalings)
    torch.testing.assert_close(4.0 * result.b @ result.a, expected, atol=1e-4, rtol=1e-5)


def test_rank_larger_than_the_average_pads_with_zeros() -> None:
    bs, as_ = random_clients([1, 1], d=6, k=5)
    result = product_average(bs, as_, [1.0, 1.0], rank=8)
    assert result.b.shape == (6, 8) and result.a.shape == (8, 5)
    assert torch.all(result.b[:, 5:] == 0) and torch.all(result.a[5:] == 0)
    torch.testing.assert_close(result.b @ result.a, dense_average(bs, as_, [1.0, 1.0]), atol=1e-5, rtol=1e-5)


def test_zero_update_gives_zero_error_not_nan() -> None:
    result = product_average([torch.zeros(5, 2)], [torch.zeros(2, 4)], [1.0], rank=2)
    assert result.truncation_error == 0.0 and torch.all(result.b == 0)


@pytest.mark.parametrize("weights", [[1.0, -1.0], [float("nan"), 1.0], [0.0, 0.0], []])
def test_bad_weights_are_rejected(weights: list[float]) -> None:
    with pytest.raises(ValueError, match="weights"):
        normalized_weights(weights)


def test_mismatched_factors_are_rejected() -> None:
    with pytest.raises(ValueError, match="client 1"):
        product_average([torch.zeros(4, 2), torch.zeros(4, 3)], [torch.zeros(2, 5), torch.zeros(2, 5)], [1, 1], 2)


def test_weighted_average_and_states() -> None:
    states = [{"x": torch.ones(2), "y": torch.zeros(1)}, {"x": 3 * torch.ones(2), "y": torch.ones(1)}]
    out = average_states(states, [1.0, 3.0])
    torch.testing.assert_close(out["x"], torch.full((2,), 2.5))
    torch.testing.assert_close(out["y"], torch.full((1,), 0.75))
    with pytest.raises(ValueError, match="shapes"):
        weighted_average([torch.ones(2), torch.ones(3)], [1, 1])


def test_lora_pairs() -> None:
    keys = [
        "m.q.lora_A.default.weight",
        "m.q.lora_B.default.weight",
        "m.v.lora_A.weight",
        "m.v.lora_B.weight",
        "m.k.lora_B.default.weight",
        "head.weight",
    ]
    assert lora_pairs(keys) == {
        "m.q.default": ("m.q.lora_A.default.weight", "m.q.lora_B.default.weight"),
        "m.v": ("m.v.lora_A.weight", "m.v.lora_B.weight"),
    }  # a lone factor (LoRA-FA's B) is no pair
