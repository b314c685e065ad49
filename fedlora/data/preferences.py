"""Offline preference pairs for reward models, built from a source's own answers.

A source with categories (``chatterbot``: 21 topics of question/answer pairs)
gives each question two answers: its own as *chosen*, and the answer of a
question from another category as *rejected*, drawn with the run's seed before
the data is split, so every party builds the same pairs and the server's test
pairs never meet a client. A good reward model must then prefer the on-topic,
matching answer, which the base model (a random score head) ranks at chance.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset

REJECTED = "rejected"
"""The column holding each row's rejected answer (its ``response`` is the chosen one)."""


def preference_pairs(data: Dataset, seed: int) -> Dataset:
    """``data`` with a ``rejected`` column: for each row, the response of a random row of another label.

    Raises ``ValueError`` when the data has fewer than two labels (no answer could be off-topic).
    """
    labels = np.asarray(data["label"])
    if len(np.unique(labels)) < 2:
        raise ValueError("preference pairs need at least two categories (data.label-column) to draw rejected answers")
    rng = np.random.default_rng(seed)
    others = rng.integers(len(data), size=len(data))
    while (same := labels[others] == labels).any():  # redraw the partners that share their row's category
        others[same] = rng.integers(len(data), size=int(same.sum()))
    responses = data["response"]
    return data.add_column(REJECTED, [responses[j] for j in others])
