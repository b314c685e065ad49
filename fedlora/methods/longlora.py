"""LongLoRA: LoRA plus trainable embeddings and norms, trained with shifted sparse attention (S²-Attn).

Chen et al., "LongLoRA: Efficient Fine-tuning of Long-Context Large Language
Models", ICLR 2024, https://arxiv.org/abs/2309.12307. During training each
attention layer splits the sequence into groups of ``longlora.group-size``
tokens and attends only within a group; half of the heads see groups shifted
by half a group, so information flows between neighbouring groups. Attention
memory and compute fall from N² to N·G per head. At inference the model uses
full attention, as the paper does. The paper's "LoRA+" also trains the
embeddings and the normalisation layers (``longlora.trainable-modules``, peft's
``modules_to_save``), which its ablation finds necessary for long contexts.

Federated, everything that trains travels: the LoRA factors (aggregated by
the strategy) and the embedding and norm copies (averaged element-wise). The
embedding matrix dominates the bytes (vocabulary × hidden: SmolLM2's is 28 M
parameters, 113 MB in float32 per message each way); leave ``embed_tokens`` out
of ``longlora.trainable-modules`` to send LoRA and norms only.

S²-Attn is a transformers attention function (:func:`s2_attention`, registered
per group size with its mask function); :func:`shifted_sparse_attention` is the
pure tensor math. Llama-architecture causal LMs only (SmolLM2). Since
inference is full attention, the saved adapter is an ordinary peft folder.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from peft import LoraConfig
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from fedlora.config import RunConfig, opt
from fedlora.methods.base import task_type
from fedlora.methods.lora import LORA_OPTIONS, Lora
from fedlora.models import CAUSAL_LM, load_base_model


@dataclass(frozen=True)
class LongLoraSettings:
    """LongLoRA (``adapter.method='longlora'``): shifted sparse attention in training, embeddings and norms trained."""

    section: ClassVar[str] = "longlora"

    group_size: int = opt(
        0,
        "Tokens per attention group of S²-Attn during training (full attention for shorter sequences and at "
        "inference); 0: a quarter of `train.max-length`, the paper's ratio.",
        check=lambda v, _: v >= 0,
    )
    trainable_modules: str = opt(
        "embed_tokens,norm",
        "Modules trained whole beside LoRA (peft `modules_to_save`, matched by name suffix: `norm` is every "
        "RMSNorm); the paper trains embeddings and norms. The embeddings dominate the bytes on the wire.",
    )


ARCHITECTURES = ("llama",)
"""``config.model_type`` values whose attention layers take a transformers attention function."""


def group_order(length: int, heads: int, group: int) -> Tensor:
    """Per head, the sequence positions in group order: the first heads plain, the last ``heads // 2`` shifted.

    ``length`` is a multiple of ``group``; a shifted head's groups start half a
    group later (its last group wraps round to the first positions).
    """
    plain = torch.arange(length)
    shifted = plain.roll(-(group // 2))
    return torch.stack([plain] * (heads - heads // 2) + [shifted] * (heads // 2))


def shifted_sparse_attention(
    query: Tensor, key: Tensor, value: Tensor, allowed: Tensor | None, group: int, scaling: float, dropout: float = 0.0
) -> Tensor:
    """S²-Attn of ``query``/``key``/``value`` (batch × heads × length × dim), returned as batch × length × heads × dim.

    ``allowed`` (batch × 1 × length × length, boolean) is the full attention
    mask (causal and padding; ``None``: causal alone); within a group, a query
    attends to the keys this mask allows, read at their original positions, so
    a group as long as the sequence is full attention. A sequence not a multiple
    of ``group`` is padded with keys nobody may attend to. Every query may attend
    to itself, so a fully masked (padding) row gives its own value instead of NaN.
    """
    batch, heads, length, dim = query.shape
    if allowed is None and length % group == 0:
        return _causal_groups(query, key, value, group, scaling, dropout)
    if allowed is None:
        allowed = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()[None, None]
        allowed = allowed.expand(batch, 1, length, length)
    padded = math.ceil(length / group) * group
    order = group_order(padded, heads, group).to(query.device)
    keep = torch.zeros(batch, padded, padded, dtype=torch.bool, device=query.device)
    keep[:, :length, :length] = allowed[:, 0]
    keep |= torch.eye(padded, dtype=torch.bool, device=query.device)
    blocks = order.view(heads, padded // group, group)
    mask = keep[:, blocks[..., :, None], blocks[..., None, :]]  # batch × heads × groups × group × group
    index = order[None, :, :, None].expand(batch, heads, padded, dim)

    def grouped(states: Tensor) -> Tensor:
        states = nn.functional.pad(states, (0, 0, 0, padded - length))
        return states.gather(2, index).view(batch, heads, padded // group, group, dim)

    out = nn.functional.scaled_dot_product_attention(
        grouped(query), grouped(key), grouped(value), attn_mask=mask, dropout_p=dropout, scale=scaling
    )
    result = torch.empty(batch, heads, padded, dim, dtype=out.dtype, device=out.device)
    result.scatter_(2, index, out.reshape(batch, heads, padded, dim))
    return result[:, :, :length].transpose(1, 2).contiguous()


def _causal_groups(query: Tensor, key: Tensor, value: Tensor, group: int, scaling: float, dropout: float) -> Tensor:
    """S²-Attn under a causal mask alone, ``length`` a multiple of ``group``: SDPA's causal kernel on every group.

    Only a shifted head's last group, which wraps round to the first positions,
    needs an explicit mask (by original position); no length × length mask is
    ever built.
    """
    batch, heads, length, dim = query.shape
    groups, half, shift = length // group, heads // 2, group // 2

    def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        return nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=scaling
        )

    def blocks(states: Tensor, count: int) -> Tensor:  # batch × h × count·group × dim -> batch·count × h × group × dim
        h = states.shape[1]
        return states.reshape(batch, h, count, group, dim).transpose(1, 2).reshape(batch * count, h, group, dim)

    def unblocks(states: Tensor, count: int) -> Tensor:
        h = states.shape[1]
        return states.reshape(batch, count, h, group, dim).transpose(1, 2).reshape(batch, h, count * group, dim)

    plain = [t[:, : heads - half] for t in (query, key, value)]
    out_plain = unblocks(attend(*(blocks(t, groups) for t in plain)), groups)
    shifted = [t[:, heads - half :].roll(-shift, dims=2) for t in (query, key, value)]
    inner = length - group  # the shifted groups that do not wrap are causal in their own order
    parts = [unblocks(attend(*(blocks(t[:, :, :inner], groups - 1) for t in shifted)), groups - 1)] if inner else []
    positions = torch.arange(length, device=query.device).roll(-shift)[inner:]
    wrapped = positions[None, :] <= positions[:, None]
    parts.append(attend(*(t[:, :, inner:] for t in shifted), wrapped))
    out_shifted = torch.cat(parts, 2).roll(shift, dims=2)
    return torch.cat([out_plain, out_shifted], 1).transpose(1, 2).contiguous()


def s2_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    *,
    group: int,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """A transformers attention function: S²-Attn while training on sequences longer than ``group``, else SDPA."""
    length = query.shape[2]
    if not module.training or length <= group:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    mask = None if attention_mask is None else attention_mask.bool()  # None: causal alone (no padding)
    return shifted_sparse_attention(query, key, value, mask, group, scale, dropout), None


def register_s2(group: int) -> str:
    """Register S²-Attn with groups of ``group`` tokens (and SDPA's mask function) in transformers; its name."""
    name = f"longlora-s2-{group}"
    AttentionInterface.register(name, functools.partial(s2_attention, group=group))
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def group_size(cfg: RunConfig) -> int:
    """``longlora.group-size``, or a quarter of ``train.max-length`` (the paper's ratio) when 0."""
    return cfg.longlora.group_size or max(1, cfg.train.max_length // 4)


class LongLora(Lora):
    """LoRA with trainable embeddings and norms, trained under S²-Attn."""

    name = "longlora"
    settings = LongLoraSettings
    uses = LORA_OPTIONS

    def peft_config(self, cfg: RunConfig, task: str) -> LoraConfig:
        """LoRA with ``longlora.trainable-modules`` trained whole (peft's ``modules_to_save``)."""
        modules = [m.strip() for m in cfg.longlora.trainable_modules.split(",") if m.strip()]
        return LoraConfig(task_type=task_type(task), modules_to_save=modules or None, **self.lora_kwargs(cfg))

    def load_base(self, path: Path, task: str, num_labels: int, cfg: RunConfig) -> PreTrainedModel:
        """The base with S²-Attn as its attention (full attention outside training); Llama causal LMs only."""
        if task != CAUSAL_LM:
            raise ValueError(f"adapter.method='longlora' trains causal LMs, not model.task='{task}'")
        model = load_base_model(path, task, num_labels)
        if model.config.model_type not in ARCHITECTURES:
            raise ValueError(
                f"adapter.method='longlora' needs a Llama-architecture model, got model_type="
                f"'{model.config.model_type}'"
            )
        model.set_attn_implementation(register_s2(group_size(cfg)))
        return model
