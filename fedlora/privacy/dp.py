"""Client-level differential privacy: clipping, Gaussian noise, and (ε, δ) from Opacus' RDP accountant.

DP-FedAvg (McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private
Recurrent Language Models", ICLR 2018, https://arxiv.org/abs/1710.06963): each
client's update (what it sends minus what it was sent) is clipped to L2 norm
``C``, the clipped updates are summed with equal weights (a weight would scale
one client's influence, the sensitivity, past ``C``) and Gaussian noise of
standard deviation ``σ·C`` is added to the sum, which is then divided by the
number of clients. One round is then a sampled Gaussian mechanism with noise
multiplier ``σ`` and sampling rate ``q`` (clients sampled / clients connected),
and the rounds compose; Opacus' RDP accountant turns that history into ε at a
given δ.

What is clipped is exactly what travels, so the choice of factor space follows
from the method: LoRA clips A and B together (factor averaging averages them,
noised); LoRA-FA sends only B (A is frozen and rebuilt from the seed), so its
noise lands on B alone, the FFA-LoRA argument (Sun et al., ICLR 2024,
https://arxiv.org/abs/2403.12313): noising both factors of a product multiplies
the noise, noising one keeps it linear.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from opacus.accountants import RDPAccountant
from torch import Tensor


def flatten_update(state: Mapping[str, Tensor], sent: Mapping[str, Tensor]) -> np.ndarray:
    """``state − sent`` over ``sent``'s tensors, in ``sent``'s order, as one float64 vector."""
    return np.concatenate([(state[k].double() - v.double()).numpy().ravel() for k, v in sent.items()])


def add_update(sent: Mapping[str, Tensor], update: np.ndarray) -> dict[str, Tensor]:
    """``sent`` plus a flat ``update`` (:func:`flatten_update`'s layout), in float32."""
    out, offset = {}, 0
    for key, tensor in sent.items():
        part = torch.from_numpy(update[offset : offset + tensor.numel()].copy()).reshape(tensor.shape)
        out[key] = (tensor.double() + part).float()
        offset += tensor.numel()
    if offset != update.size:
        raise ValueError(f"update of {update.size} values for an adapter of {offset}")
    return out


def clip(update: np.ndarray, clip_norm: float) -> np.ndarray:
    """``update`` scaled down to L2 norm ``clip_norm`` if longer."""
    norm = float(np.linalg.norm(update))
    return update * (clip_norm / norm) if norm > clip_norm else update


def gaussian(size: int, std: float) -> np.ndarray:
    """Gaussian noise from a generator seeded by the OS (no party can replay it from the run's seed)."""
    return np.random.default_rng().normal(0.0, std, size) if std > 0 else np.zeros(size)


def noisy_mean(updates: Sequence[np.ndarray], clip_norm: float, noise_multiplier: float) -> np.ndarray:
    """The server's DP mean: the clipped updates summed, ``N(0, (σ·C)²)`` added, divided by their number."""
    total = np.sum([clip(u, clip_norm) for u in updates], axis=0)
    return (total + gaussian(total.size, noise_multiplier * clip_norm)) / len(updates)


def epsilon(history: Sequence[tuple[float, float]], delta: float) -> float:
    """ε after rounds of ``(noise multiplier, sampling rate)`` at ``delta`` (Opacus' RDP accountant); inf if σ = 0."""
    if any(sigma <= 0 for sigma, _ in history):
        return float("inf")
    accountant = RDPAccountant()
    for sigma, rate in history:
        accountant.step(noise_multiplier=sigma, sample_rate=rate)
    return float(accountant.get_epsilon(delta))
