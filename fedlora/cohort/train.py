"""Local training of a whole cohort of virtual clients in one batched pass per step.

Each step takes every client's next batch (from its own seeded loader, so its
data order is the one it has when trained alone), pads them to one shape and
stacks them client-major; the base runs once over the lot and each block goes
through its own client's adapter (:class:`fedlora.cohort.stacked.StackedAdapter`).
The loss is each client's own mean loss, summed over clients: the gradient of
client ``k``'s slice is then exactly that of its own loss. Clipping uses each
client's own gradient norm.

The optimizer is the method's own (``AdapterMethod.optimizer``: AdamW, SGD,
LoRA+'s per-factor learning rates, LoRA-FA's projected AdamW), rebuilt over the
stacked tensors with the same parameter groups. That is exact because these
optimizers act element by element, or (LoRA-FA's projection ``grad_B·(AAᵀ)⁻¹``
with A shared) by a product on the right that broadcasts over the client
axis: one optimizer over ``(K, …)`` tensors is K independent optimizers.

Dropout draws its masks from one random stream for the whole cohort; every
sample still gets its own independent mask, but not the bits it would get
alone, so bit-level equality with solo training holds with dropout 0.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from fedlora.cohort.stacked import StackedAdapter
from fedlora.data.tokenize import IGNORE_INDEX
from fedlora.models import CLASSIFICATION
from fedlora.training import precision_context


@dataclass
class CohortMember:
    """One virtual client's part of a cohort: where its adapter starts and its seeded batches."""

    state: Mapping[str, Tensor]  # every trainable tensor of the model, at the model's shapes
    loader: DataLoader


def rebuild_optimizer(optimizer: torch.optim.Optimizer, stacked: StackedAdapter) -> torch.optim.Optimizer:
    """The same optimizer class and parameter groups, over the stacked tensors instead of the model's."""
    names = {id(p): name for name, p in stacked.model.named_parameters()}
    groups = [
        {**group, "params": [stacked.params.get(names.get(id(p), ""), p) for p in group["params"]]}
        for group in optimizer.param_groups
    ]
    return type(optimizer)(groups)


def merge_batches(batches: list[dict[str, Tensor]], pad_token_id: int) -> tuple[dict[str, Tensor], Tensor]:
    """One client-major batch from each client's batch, and the mask of real (not padding) rows.

    Every client's block gets the same number of rows (the largest batch; a
    smaller one is filled up with copies of its first row, masked out of the
    loss) and every sequence the same length (right-padded, masked by the
    attention mask and ignored labels). Padding rows are copies rather than
    empty rows because an all-padding row can make attention produce NaN,
    which would survive a zero loss weight in the backward pass.
    """
    rows = max(len(b["input_ids"]) for b in batches)
    length = max(b["input_ids"].shape[1] for b in batches)
    pad_values = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}
    merged: dict[str, list[Tensor]] = {key: [] for key in batches[0]}
    real = []
    for batch in batches:
        count = len(batch["input_ids"])
        index = torch.cat([torch.arange(count), torch.zeros(rows - count, dtype=torch.long)])
        for key, value in batch.items():
            value = value[index]
            if value.dim() == 2:
                value = F.pad(value, (0, length - value.shape[1]), value=pad_values.get(key, 0))
            merged[key].append(value)
        real.append(torch.arange(rows) < count)
    return {key: torch.cat(values) for key, values in merged.items()}, torch.cat(real)


def client_losses(logits: Tensor, labels: Tensor, real: Tensor, clients: int, task: str) -> Tensor:
    """Each client's mean loss over its real samples (classification) or answer tokens (causal LM), shape (K,)."""
    logits = logits.float()
    if task == CLASSIFICATION:
        per_item = F.cross_entropy(logits, labels, reduction="none")
        weight = real.to(per_item.dtype)
    else:
        targets = labels[:, 1:]
        per_item = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        ).view(targets.shape)
        weight = ((targets != IGNORE_INDEX) & real[:, None]).to(per_item.dtype)
    sums = (per_item * weight).reshape(clients, -1).sum(1)
    return sums / weight.reshape(clients, -1).sum(1).clamp(min=1)


def _answer_logits_only(model: torch.nn.Module) -> bool:
    """Whether the causal LM's logits are its output layer applied to the last hidden state, nothing more."""
    base = model.get_base_model()
    post = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")  # Gemma 2, Cohere, Granite
    return base.get_output_embeddings() is not None and not any(getattr(base.config, k, None) for k in post)


def cohort_losses(
    model: torch.nn.Module, batch: dict[str, Tensor], labels: Tensor, real: Tensor, clients: int, task: str
) -> Tensor:
    """Each client's mean loss on a client-major batch, shape (K,).

    For a causal LM the vocabulary projection runs only where a label is (the
    answer tokens of real rows): on short answers after long prompts and
    padding, most of a batch's logits, the largest tensors of a step, are never
    computed. The loss is the same as from full logits.
    """
    if task == CLASSIFICATION or not _answer_logits_only(model):
        return client_losses(model(**batch).logits, labels, real, clients, task)
    base = model.get_base_model()
    hidden = base.get_decoder()(**batch, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = (targets != IGNORE_INDEX) & real[:, None]
    logits = base.get_output_embeddings()(hidden[:, :-1][keep]).float()
    per_token = F.cross_entropy(logits, targets[keep], reduction="none")
    owner = (torch.arange(len(labels), device=labels.device) // (len(labels) // clients))[:, None]
    owner = owner.expand_as(targets)[keep]
    sums = torch.zeros(clients, dtype=per_token.dtype, device=per_token.device).index_add(0, owner, per_token)
    return sums / torch.bincount(owner, minlength=clients).clamp(min=1)


def clip_per_client(params: list[Tensor], max_norm: float, clients: int) -> None:
    """``torch.nn.utils.clip_grad_norm_`` applied to each client's slice of the gradients separately."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.stack([g.reshape(clients, -1).norm(dim=1) for g in grads]).norm(dim=0)  # (K,)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for grad in grads:
        grad.mul_(coef.view(clients, *[1] * (grad.dim() - 1)).to(grad.dtype))


def _steps(loader: DataLoader, steps: int) -> Iterator[dict[str, Tensor]]:
    """``steps`` batches, cycling through ``loader`` as solo training does."""
    return itertools.islice(itertools.cycle(loader), steps)


def train_cohort(
    model: torch.nn.Module,
    members: list[CohortMember],
    optimizer: torch.optim.Optimizer,
    steps: int,
    max_grad_norm: float,
    task: str,
    pad_token_id: int,
    precision: str = "float32",
) -> tuple[list[dict[str, Tensor]], list[float]]:
    """Train every member ``steps`` steps together; return each one's trained state and mean loss.

    ``optimizer`` is the method's optimizer over the model's own trainable
    tensors (what solo training would use); it is rebuilt over the stacked ones.
    A member whose loss becomes NaN or Inf gets NaN as its loss (its slice is
    isolated from the others, which train on).
    """
    stacked = StackedAdapter(model, [m.state for m in members])
    optimizer = rebuild_optimizer(optimizer, stacked)
    params = list(stacked.params.values())
    device = params[0].device
    clients = len(members)
    totals = torch.zeros(clients, dtype=torch.float64)
    model.train()
    with stacked.applied():
        for batches in zip(*(_steps(m.loader, steps) for m in members), strict=True):
            batch, real = merge_batches(list(batches), pad_token_id)
            batch, real = {k: v.to(device) for k, v in batch.items()}, real.to(device)
            labels = batch.pop("labels")
            with precision_context(precision, device):
                losses = cohort_losses(model, batch, labels, real, clients, task)
            finite = torch.isfinite(losses)
            losses.where(finite, 0.0).sum().backward()
            if max_grad_norm > 0:
                clip_per_client(params, max_grad_norm, clients)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            totals += losses.detach().double().cpu().where(finite.cpu(), torch.nan)
    return stacked.client_states(), (totals / steps).tolist()
