"""FlexLoRA: the exact average of the clients' products, redistributed to each client's rank by SVD.

Bai et al., "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources", NeurIPS 2024,
https://arxiv.org/abs/2402.11505. Clients of any rank return ``B_k, A_k``; the
server forms ``Σ_k p_k · B_k·A_k`` exactly and keeps its best rank-r
approximation as the global adapter (:class:`strategies.fedavg_products.FedAvgProducts`,
QR + SVD of the stacked factors, never the dense d×k matrix). Its factors come
out ordered by singular value, so a client of rank r_k receives the first r_k
components: the best rank-r_k approximation of the global update.
"""

from __future__ import annotations

from torch import Tensor

from fedlora.adapter import resize_state
from strategies.base import NodeProfile
from strategies.fedavg_products import FedAvgProducts


class FlexLoRA(FedAvgProducts):
    """FedAvg over products for clients of mixed ranks; each client gets the global SVD cut to its rank."""

    per_node = True

    def client_state(self, profile: NodeProfile) -> dict[str, Tensor]:
        """The global adapter's ``profile.rank`` leading singular components."""
        return resize_state(self.global_state, profile.rank)
