"""Local training and evaluation loops.

Kept as two small loops rather than ``transformers.Trainer``: a federated round
is a handful of steps on an already-loaded model, and the Trainer's set-up per
call would cost more than the steps themselves.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from datasets import Dataset
from peft import PeftModel
from torch.utils.data import DataLoader

from fedlora.config import TrainSettings
from fedlora.data.tokenize import IGNORE_INDEX
from fedlora.keys import NUM_EXAMPLES
from fedlora.models import CLASSIFICATION, REWARD
from fedlora.reward import bradley_terry_loss, pair_rewards, pairs_ranked_right


def round_lr(server_round: int, num_rounds: int, lr: float, lr_min: float) -> float:
    """Cosine decay over server rounds: ``lr`` in round 1, ``lr_min`` in the last (as in FlowerTune)."""
    progress = (server_round - 1) / max(num_rounds - 1, 1)
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_loader(
    dataset: Dataset, collate: Callable[[list[dict[str, Any]]], Any], batch_size: int, seed: int | None = None
) -> DataLoader:
    """Batches of ``dataset``; shuffled with a seeded generator when ``seed`` is given."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset.with_format("python"),
        batch_size=batch_size,
        shuffle=seed is not None,
        generator=generator,
        collate_fn=collate,
    )


def _to(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def precision_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for ``train.precision`` bfloat16 or float16 (weights, gradients and optimizer stay float32)."""
    if precision in ("bfloat16", "float16"):
        return torch.autocast(device_type=device.type, dtype=getattr(torch, precision))
    return contextlib.nullcontext()


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler for float16: keeps small gradients from flushing to zero (a pass-through otherwise).

    float16 has more precision than bfloat16 but far less range: unscaled, gradients
    below about 6e-8 underflow. The scaler multiplies the loss before the
    backward pass, divides the gradients before clipping and the step, and skips
    a step whose gradients overflowed (lowering the scale for the next one).
    """
    return torch.amp.GradScaler(device.type, enabled=precision == "float16")


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that train (and so travel)."""
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(params: list[torch.nn.Parameter], settings: TrainSettings, lr: float) -> torch.optim.Optimizer:
    """The configured local optimizer over the trainable parameters."""
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=settings.weight_decay)


def add_proximal_gradient(params: list[torch.nn.Parameter], anchor: list[torch.Tensor], mu: float) -> None:
    """Add the gradient of FedProx's term ``mu/2 · ‖w − w_global‖²``, ``mu · (w − w_global)``, to each ``p.grad``.

    Li et al., "Federated Optimization in Heterogeneous Networks" (FedProx),
    MLSys 2020, https://arxiv.org/abs/1812.06127. Adding the term's gradient
    directly is the same step as adding the term to the loss (as Flower's FedProx
    example does) without a second autograd graph over the parameters.
    """
    for param, start in zip(params, anchor, strict=True):
        term = mu * (param.detach() - start)
        param.grad = term if param.grad is None else param.grad.add_(term)


def _step_groups(loader: DataLoader, steps: int, accumulation: int, epochs: int) -> Iterator[list[Any]]:
    """The micro-batches of each optimizer step: ``steps`` groups cycling through ``loader``, or ``epochs`` passes.

    A pass re-iterates ``loader`` (a shuffled loader draws a new order) and its
    last group may be short, so every example counts once per epoch.
    """
    if epochs:
        for _ in range(epochs):
            batches = iter(loader)
            while group := list(itertools.islice(batches, accumulation)):
                yield group
    else:
        batches = itertools.cycle(loader)
        for _ in range(steps):
            yield list(itertools.islice(batches, accumulation))


def _targets(batch: Mapping[str, torch.Tensor]) -> int:
    """How many terms the batch's mean loss averages.

    Answer tokens after the first position (causal LM), pairs (reward: a batch
    without labels, :mod:`fedlora.reward`), else rows.
    """
    if "labels" not in batch:
        return batch["input_ids"].shape[0] // 2
    labels = batch["labels"]
    return int((labels[:, 1:] != IGNORE_INDEX).sum()) if labels.dim() > 1 else labels.shape[0]


def batch_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The model's own loss on a labelled batch; the Bradley-Terry loss on a batch of preference pairs (no labels)."""
    if "labels" not in batch:
        return bradley_terry_loss(*pair_rewards(model, batch))
    return model(**batch).loss


def train_steps(
    model: torch.nn.Module,
    loader: DataLoader,
    steps: int,
    optimizer: torch.optim.Optimizer,
    max_grad_norm: float,
    after_step: Callable[[int], None] | None = None,
    precision: str = "float32",
    accumulation: int = 1,
    epochs: int = 0,
    proximal_mu: float = 0.0,
) -> float:
    """Run ``steps`` optimizer steps (cycling through ``loader``), or ``epochs`` passes; return the mean step loss.

    Each step adds up the gradients of ``accumulation`` micro-batches. The
    model's loss is a mean over its batch's targets (answer tokens, or examples),
    so each micro-batch's loss is weighted by its share of the step's targets:
    the step is then the one of a single batch of all of them, not the mean of
    unequal micro-batch means. ``after_step(i)`` runs after optimizer step
    ``i``, while the gradients are still there (AdaLoRA's budget allocator reads them),
    unscaled under ``precision = float16`` (:func:`grad_scaler`).
    With ``proximal_mu`` > 0 every step also pulls the trainable tensors towards
    where they started (FedProx, :func:`add_proximal_gradient`); the returned loss
    is the data loss alone.
    """
    model.train()
    params = trainable_parameters(model)
    device = params[0].device
    anchor = [p.detach().clone() for p in params] if proximal_mu else []
    scaler = grad_scaler(precision, device)
    losses = []
    for step, group in enumerate(_step_groups(loader, steps, accumulation, epochs)):
        total = sum(_targets(batch) for batch in group)
        step_loss = 0.0
        for batch in group:
            with precision_context(precision, device):
                loss = batch_loss(model, _to(batch, device)) * (_targets(batch) / total)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()}; lower train.lr")
            scaler.scale(loss).backward()
            step_loss += loss.item()
        scaler.unscale_(optimizer)
        if proximal_mu:
            add_proximal_gradient(params, anchor, proximal_mu)
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        scaler.step(optimizer)  # skipped if a gradient overflowed in float16
        scaler.update()
        if after_step:
            after_step(step)
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
    return sum(losses) / len(losses)


def _scored_positions(labels: torch.Tensor) -> int:
    """How many last positions' logits a causal-LM loss reads: from the one before the batch's first answer token.

    The prompt before it (a chat template's system text included) needs no
    logits, and the vocabulary projection is a fifth of a small model's compute
    per token, so :func:`evaluate` asks the model only for these (transformers'
    ``logits_to_keep``).
    """
    answer = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero()
    first = int(answer[0]) + 1 if len(answer) else labels.shape[1]
    return labels.shape[1] - first + 1


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, task: str) -> dict[str, float]:
    """Loss and accuracy (classification), pairwise accuracy (reward) or perplexity (causal LM, over answer tokens).

    The loss is computed here from the logits, not taken from the model: a
    method may add a regulariser to ``outputs.loss`` (AdaLoRA's orthogonality
    term), which is not part of how well the model fits the data. The
    causal-LM loss is averaged over the answer tokens of the whole set, so it
    does not depend on the batch size.
    """
    model.eval()
    device = next(model.parameters()).device
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    keeps_logits = "logits_to_keep" in inspect.signature(base.forward).parameters
    total_loss, total_count, correct, examples = 0.0, 0, 0, 0
    for batch in loader:
        batch = _to(batch, device)
        if task == REWARD:
            chosen, rejected = pair_rewards(model, batch)
            total_loss += bradley_terry_loss(chosen, rejected, reduction="sum").item()
            total_count += len(chosen)
            correct += pairs_ranked_right(chosen, rejected)
            examples += len(chosen)
            continue
        labels = batch.pop("labels")
        if task == CLASSIFICATION:
            logits = model(**batch).logits.float()
            loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
            count = labels.numel()
            correct += int((logits.argmax(-1) == labels).sum())
        else:
            keep = _scored_positions(labels)
            kwargs = {"logits_to_keep": keep} if keeps_logits else {}
            # The last `keep` positions (prompt tuning prepends virtual-token positions before them).
            logits = model(**batch, **kwargs).logits[:, -keep:].float()
            targets = labels[:, labels.shape[1] - keep + 1 :]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
            )
            count = int((targets != -100).sum())
        total_loss += loss.item()
        total_count += count
        examples += labels.shape[0]
    loss = total_loss / max(total_count, 1)
    metrics = {"eval-loss": loss, NUM_EXAMPLES: examples}
    if task in (CLASSIFICATION, REWARD):
        metrics["eval-accuracy"] = correct / max(examples, 1)  # reward: the share of pairs ranked right
    else:
        metrics["eval-perplexity"] = math.exp(min(loss, 50.0))
    return metrics
