"""FedSA-LoRA: share A, keep B on the client.

Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated
Learning" (FedSA-LoRA), ICLR 2025, https://arxiv.org/abs/2410.01463: the A
matrices learn what clients have in common and are aggregated; the B matrices
capture each client's own data and stay local. Every other tensor (a
classification head) is shared. Each client's B persists on the client between
rounds (its on-disk store), so each client ends with a personal adapter: its
own B on the federation's A. The server's global adapter holds only the shared
part (its B stay at their initial zeros), so evaluate with client-side
evaluation (``fraction-evaluate`` > 0).
"""

from __future__ import annotations

from fedlora.config import RunConfig
from fedlora.keys import is_lora_b
from strategies.split import SplitStrategy


class FedSA(SplitStrategy):
    """LoRA A aggregated over all clients, B local to each."""

    @classmethod
    def server_optimizer_refusal(cls, cfg: RunConfig) -> str:
        """Allowed with either ``within``: only A is shared, so nothing is re-factorised."""
        return ""

    @classmethod
    def sum_refusal(cls, cfg: RunConfig) -> str:
        """None with either ``within``: only A is shared, a mean (no B·A to re-factorise), one sum over all clients."""
        return ""

    def scope(self, key: str) -> str:
        """``LOCAL`` for B factors, ``GLOBAL`` for the rest."""
        return self.LOCAL if is_lora_b(key) else self.GLOBAL
