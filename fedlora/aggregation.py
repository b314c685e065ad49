"""Aggregation math for low-rank adapters, as pure functions on tensors.

Strategies in ``strategies/`` are thin Flower glue around these; a custom
strategy can call them directly.

Why two averages. A LoRA layer adds ``s·B·A`` to a frozen weight (``B``: d×r,
``A``: r×k, ``s = alpha/r``). Averaging the factors separately (FedIT) gives
``s·mean(B)·mean(A)``, which is *not* the average of the clients' updates
``s·mean(B·A)``: the cross terms ``B_i·A_j`` creep in. The exact average has rank
up to the sum of the clients' ranks; :func:`product_average` computes it and
re-factorises it to rank ``r`` with the best rank-``r`` approximation
(Eckart-Young), without ever forming the dense d×k matrix: it only factorises
the stacked factors (QR) and takes an SVD of the small core.

Clients of different ranks. Factors of rank ``r_k`` and ``r`` are compared by
padding with zeros or truncating (:func:`resize_rank`); every client's update
is scaled by the global ``alpha/r`` (a rank-``r_k`` client trains the first
``r_k`` components of a rank-``r`` adapter), so a factor means the same at
every rank. Stacking
(:func:`stack_factors`) is exact for any mix of ranks; AdaLoRA's triplets are
merged index by index over the clients that kept that index
(:func:`masked_average`), and cut to a global budget (:func:`budget_masks`).
Which tensors form a LoRA layer is read from their keys (:func:`fedlora.keys.lora_pairs`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def normalized_weights(weights: Sequence[float]) -> list[float]:
    """Weights scaled to sum to 1; they must be finite, non-negative, not all zero, and sum to a finite number."""
    total = float(sum(weights)) if weights else 0.0
    if any(not math.isfinite(w) or w < 0 for w in weights) or not 0 < total < math.inf:
        raise ValueError(
            f"aggregation weights must be finite, non-negative, not all zero, with a finite sum: {list(weights)}"
        )
    return [w / total for w in weights]


def weighted_average(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Σ p_k · t_k in float32, with p the normalised weights."""
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"cannot average tensors of different shapes: {sorted(shapes)}")
    out = torch.zeros_like(tensors[0], dtype=torch.float32)
    for tensor, p in zip(tensors, normalized_weights(weights), strict=True):
        out += p * tensor.float()
    return out


def average_states(
    states: Sequence[Mapping[str, Tensor]], weights: Sequence[float], keys: Sequence[str] | None = None
) -> dict[str, Tensor]:
    """Key-wise weighted average of state dicts (all of ``keys``, default the first state's keys)."""
    keys = list(states[0]) if keys is None else keys
    return {key: weighted_average([s[key] for s in states], weights) for key in keys}


@dataclass(frozen=True)
class Refactorized:
    """A rank-``r`` factorisation ``B·A`` of an averaged update."""

    b: Tensor  # d × r
    a: Tensor  # r × k
    singular_values: Tensor  # all singular values of the exact average, descending
    truncation_error: float  # ‖exact − B·A‖_F / ‖exact‖_F (0 when nothing was cut)


def product_average(
    bs: Sequence[Tensor],
    as_: Sequence[Tensor],
    weights: Sequence[float],
    rank: int,
    scalings: Sequence[float] | None = None,
    out_scaling: float = 1.0,
) -> Refactorized:
    """Best rank-``rank`` factors of the exact weighted average of the clients' updates.

    Computes ``B·A ≈ (Σ_k p_k · s_k · B_k·A_k) / out_scaling`` where ``p`` are
    the normalised ``weights`` and ``s_k`` the clients' LoRA scalings (all 1 by
    default: with equal scalings they cancel against ``out_scaling``). Client
    ranks may differ. With Σ_k rank_k ≤ ``rank`` the result is exact.

    The dense d×k update is never formed: stacking ``B̃ = [p_1 s_1 B_1, …]``
    (d×R) and ``Ã = [A_1; …]`` (R×k), ``B̃ = Q_b R_b`` and ``Ãᵀ = Q_a R_a`` give
    ``B̃·Ã = Q_b (R_b R_aᵀ) Q_aᵀ``; the SVD of the small core ``R_b R_aᵀ`` is the
    SVD of the average. Cost O((d + k)·R²). The kept singular values are split
    evenly (√σ) between the new ``B`` and ``A``. Singular directions beyond the
    average's true rank come out as zero rows/columns, which padding keeps shaped.
    """
    if not (len(bs) == len(as_) == len(weights)) or not bs:
        raise ValueError(f"need one B, one A and one weight per client, got {len(bs)}, {len(as_)}, {len(weights)}")
    scalings = [1.0] * len(bs) if scalings is None else list(scalings)
    for i, (b, a) in enumerate(zip(bs, as_, strict=True)):
        if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(f"client {i}: B {tuple(b.shape)} and A {tuple(a.shape)} are not d×r and r×k factors")
    p = normalized_weights(weights)
    coefficients = [pk * sk / out_scaling for pk, sk in zip(p, scalings, strict=True)]
    b_stack, a_stack = stack_factors([b.double() for b in bs], [a.double() for a in as_], coefficients)
    q_b, r_b = torch.linalg.qr(b_stack)
    q_a, r_a = torch.linalg.qr(a_stack.T)
    u, sigma, vh = torch.linalg.svd(r_b @ r_a.T)
    keep = min(rank, sigma.numel())
    root = sigma[:keep].sqrt()
    b_new = torch.zeros(b_stack.shape[0], rank, dtype=torch.float64)
    a_new = torch.zeros(rank, a_stack.shape[1], dtype=torch.float64)
    b_new[:, :keep] = (q_b @ u[:, :keep]) * root
    a_new[:keep] = root[:, None] * (vh[:keep] @ q_a.T)
    total = float(sigma.square().sum())
    error = math.sqrt(float(sigma[keep:].square().sum()) / total) if total > 0 else 0.0
    return Refactorized(b=b_new.float(), a=a_new.float(), singular_values=sigma.float(), truncation_error=error)


def stack_factors(bs: Sequence[Tensor], as_: Sequence[Tensor], coefficients: Sequence[float]) -> tuple[Tensor, Tensor]:
    """``B = [c_1 B_1, …, c_K B_K]`` (d×Σr_k) and ``A = [A_1; …; A_K]`` (Σr_k×k), so ``B·A = Σ c_k B_k A_k``.

    Exact for any mix of ranks: this is FLoRA's aggregation (Wang et al., 2024).
    """
    return torch.cat([b * c for b, c in zip(bs, coefficients, strict=True)], dim=1), torch.cat(list(as_), dim=0)


def compact(b: Tensor, a: Tensor, rtol: float = 1e-6) -> tuple[Tensor, Tensor]:
    """The same product ``B·A`` with as few factor columns as its numerical rank (at least one).

    Used to keep FLoRA's stacked residual from growing by Σ r_k every round when
    its true rank grows more slowly; singular values below ``rtol``·σ_max are dropped.
    """
    result = product_average([b], [a], [1.0], b.shape[1])
    sigma = result.singular_values
    keep = max(1, int((sigma > rtol * sigma[0]).sum())) if sigma.numel() and sigma[0] > 0 else 1
    return result.b[:, :keep].contiguous(), result.a[:keep].contiguous()


def resize_rank(b: Tensor, a: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Factors cut to their first ``rank`` components, or zero-padded up to ``rank``.

    With factors ordered by singular value (as :func:`product_average` returns
    them), the cut is the best rank-``rank`` approximation (FlexLoRA); padding
    never changes ``B·A`` (HetLoRA).
    """
    current = a.shape[0]
    if rank <= current:
        return b[:, :rank].clone(), a[:rank].clone()
    return (
        torch.cat([b, b.new_zeros(b.shape[0], rank - current)], dim=1),
        torch.cat([a, a.new_zeros(rank - current, a.shape[1])], dim=0),
    )


def product_norm(b: Tensor, a: Tensor) -> float:
    """``‖B·A‖_F`` from the r×r Gram matrices, without forming the d×k product."""
    b, a = b.double(), a.double()
    return math.sqrt(max(float(torch.trace((b.T @ b) @ (a @ a.T))), 0.0))


def masked_average(
    tensors: Sequence[Tensor], masks: Sequence[Tensor], weights: Sequence[float], fallback: Tensor, dim: int = 0
) -> Tensor:
    """Weighted average along rank index ``i`` (on dimension ``dim``) over the clients whose ``masks[k][i]`` is set.

    A client that pruned index ``i`` (AdaLoRA) says nothing about it, so it must
    not pull the average towards zero; an index no client kept takes ``fallback``'s value.
    """
    p = torch.tensor(normalized_weights(weights), dtype=torch.float64)
    m = torch.stack([mask.to(torch.float64) for mask in masks])  # K × r
    mass = (p[:, None] * m).sum(0)  # r
    share = torch.where(mass > 0, p[:, None] * m / mass.clamp_min(1e-300), 0.0)  # K × r, columns sum to 1 or 0
    shape = [1] * fallback.ndim
    shape[dim] = -1
    out = sum(share[k].view(shape) * t.double() for k, t in enumerate(tensors))
    kept = (mass > 0).view(shape)
    return torch.where(kept, out, fallback.double()).to(fallback.dtype)


def budget_masks(values: Mapping[str, Tensor], budget: int) -> dict[str, Tensor]:
    """Keep the ``budget`` entries of largest magnitude over all layers (AdaLoRA's global rank budget).

    ``values`` maps a layer to its singular values ``E`` (r entries); the result
    maps it to a boolean mask of the entries kept. Ties at the threshold are kept.
    """
    flat = torch.cat([v.detach().abs().flatten() for v in values.values()])
    if budget >= flat.numel():
        return {layer: torch.ones(v.numel(), dtype=torch.bool) for layer, v in values.items()}
    threshold = torch.topk(flat, budget).values[-1] if budget > 0 else math.inf
    return {layer: v.detach().abs().flatten() >= threshold for layer, v in values.items()}
