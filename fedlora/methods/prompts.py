"""Prompt methods: trainable virtual tokens in front of every input; the model stays frozen.

* Prompt tuning: Lester et al., "The Power of Scale for Parameter-Efficient
  Prompt Tuning", EMNLP 2021, https://arxiv.org/abs/2104.08691; the virtual
  token embeddings train and travel.
* P-tuning: Liu et al., "GPT Understands, Too", 2021,
  https://arxiv.org/abs/2103.10385; the embeddings and the MLP encoder that
  reparameterises them train and travel.
* Prefix tuning: Li & Liang, ACL 2021, https://arxiv.org/abs/2101.00190; a
  prefix of keys and values in every layer, produced from trained embeddings by
  the paper's reparameterisation MLP (peft's ``prefix_projection=True``); the
  embeddings and the MLP train and travel.
* P-tuning v2: Liu et al., "P-Tuning v2: Prompt Tuning Can Be Comparable to
  Fine-tuning Universally Across Scales and Tasks", ACL 2022,
  https://arxiv.org/abs/2110.07602; the same deep prompts at every layer, trained
  directly without the reparameterisation (peft's prefix tuning with
  ``prefix_projection=False``); only the per-layer key/value prefixes travel.

All of these tensors are averaged element-wise by every strategy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

from fedlora.config import RunConfig, opt
from fedlora.methods.base import AdapterMethod, task_type


@dataclass(frozen=True)
class PromptSettings:
    """Virtual tokens of the prompt methods."""

    section: ClassVar[str] = "prompt"

    num_virtual_tokens: int = opt(16, "Virtual tokens prepended to every input.", check=lambda v, _: v >= 1)
    encoder_hidden_size: int = opt(
        128,
        "Hidden size of P-tuning's MLP encoder and of prefix tuning's reparameterisation MLP.",
        methods=("p-tuning", "prefix-tuning"),
        check=lambda v, _: v >= 1,
    )


class PromptTuning(AdapterMethod):
    """Soft prompt: ``prompt.num-virtual-tokens`` trainable embeddings."""

    name = "prompt-tuning"
    settings = PromptSettings

    def peft_config(self, cfg: RunConfig, task: str) -> PromptTuningConfig:
        """A peft ``PromptTuningConfig`` (random init)."""
        return PromptTuningConfig(task_type=task_type(task), num_virtual_tokens=cfg.prompt.num_virtual_tokens)


class PTuning(AdapterMethod):
    """Virtual tokens produced by a trained MLP encoder."""

    name = "p-tuning"
    settings = PromptSettings

    def peft_config(self, cfg: RunConfig, task: str) -> PromptEncoderConfig:
        """A peft ``PromptEncoderConfig`` with an MLP encoder."""
        return PromptEncoderConfig(
            task_type=task_type(task),
            num_virtual_tokens=cfg.prompt.num_virtual_tokens,
            encoder_hidden_size=cfg.prompt.encoder_hidden_size,
        )


class PrefixTuning(AdapterMethod):
    """Key/value prefixes in every layer, reparameterised through a trained MLP (Li & Liang)."""

    name = "prefix-tuning"
    settings = PromptSettings
    projection = True

    def peft_config(self, cfg: RunConfig, task: str) -> PrefixTuningConfig:
        """A peft ``PrefixTuningConfig`` with (or, for P-tuning v2, without) the prefix projection."""
        return PrefixTuningConfig(
            task_type=task_type(task),
            num_virtual_tokens=cfg.prompt.num_virtual_tokens,
            prefix_projection=self.projection,
            encoder_hidden_size=cfg.prompt.encoder_hidden_size,
        )


class PTuningV2(PrefixTuning):
    """Deep prompts: trainable key/value prefixes in every layer, no reparameterisation (Liu et al. 2022)."""

    name = "p-tuning-v2"
    projection = False
