"""Local-only training: nothing is shared, each client trains a personal adapter on its own data.

The baseline federated methods must beat (see McMahan et al., "Communication-
Efficient Learning of Deep Networks from Decentralized Data", AISTATS 2017, for
the comparison of federated against local training). Every tensor is local: the
server sends nothing but the round's configuration, each client continues its
own adapter from its on-disk store, and client-side evaluation (per task with
``mtlora``) measures the personal adapters.
"""

from __future__ import annotations

from fedlora.config import RunConfig
from strategies.split import SplitStrategy


class LocalOnly(SplitStrategy):
    """Every tensor local."""

    @classmethod
    def server_optimizer_refusal(cls, cfg: RunConfig) -> str:
        """Refused: nothing is aggregated."""
        return "every tensor stays on its client, so the server has nothing to step"

    @classmethod
    def sum_refusal(cls, cfg: RunConfig) -> str:
        """None: nothing travels, so there is nothing to sum (secure aggregation and DP have nothing to do)."""
        return ""

    def scope(self, key: str) -> str:
        """``LOCAL``."""
        return self.LOCAL
