"""Local-only training: nothing is shared, each client trains a personal adapter on its own data.

The baseline federated methods must beat (see McMahan et al., "Communication-
Efficient Learning of Deep Networks from Decentralized Data", AISTATS 2017, for
the comparison of federated against local training). Every tensor is local: the
server sends nothing but the round's configuration, each client continues its
own adapter from its on-disk store, and client-side evaluation (per task with
``mtlora``) measures the personal adapters.
"""

from __future__ import annotations

from strategies.split import SplitStrategy


class LocalOnly(SplitStrategy):
    """Every tensor local."""

    def scope(self, key: str) -> str:
        """``LOCAL``."""
        return self.LOCAL
