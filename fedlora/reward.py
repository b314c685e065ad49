"""Reward models: a scalar score per text, trained on preference pairs with the Bradley–Terry loss.

The stage after supervised fine-tuning in the RLHF pipeline (Ouyang et al.,
"Training language models to follow instructions with human feedback",
NeurIPS 2022, https://arxiv.org/abs/2203.02155; Stiennon et al. 2020): the model
is the base with a one-output sequence-classification head (``model.task =
reward``), whose logit at the last token is the reward r. A pair (prompt,
chosen answer, rejected answer) is scored as the probability that the chosen
answer wins, ``σ(r_chosen − r_rejected)`` (Bradley & Terry, 1952); training
minimises its negative log, and pairwise accuracy counts the pairs ranked right.

A batch of pairs holds the chosen texts in its first half of rows and their
rejected texts, in the same order, in its second half
(:func:`fedlora.data.preferences.collate_pairs`), so one forward pass scores both.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, reduction: str = "mean") -> Tensor:
    """``−log σ(r_chosen − r_rejected)`` per pair, averaged (``"mean"``) or summed (``"sum"``)."""
    loss = -F.logsigmoid(chosen.float() - rejected.float())
    return loss.sum() if reduction == "sum" else loss.mean()


def pairs_ranked_right(chosen: Tensor, rejected: Tensor) -> int:
    """How many pairs score the chosen answer strictly above the rejected one (a tie counts as wrong)."""
    return int((chosen > rejected).sum())


def pair_rewards(model: torch.nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(rewards of the chosen texts, rewards of the rejected texts) of a batch of pairs, in one forward pass."""
    rewards = model(**batch).logits.squeeze(-1)
    chosen, rejected = rewards.chunk(2)
    return chosen, rejected
