"""Prompt methods: trainable virtual tokens in front of every input; the model stays frozen.

* Prompt tuning: Lester et al., "The Power of Scale for Parameter-Efficient
  Prompt Tuning", EMNLP 2021, https://arxiv.org/abs/2104.08691; the virtual
  token embeddings train and travel.
* P-tuning: Liu et al., "GPT Understands, Too", 2021,
  https://arxiv.org/abs/2103.10385; the embeddings and the MLP encoder that
  reparameterises them train and travel.
* Prefix tuning / P-tuning v2: Li & Liang, ACL 2021,
  https://arxiv.org/abs/2101.00190, and Liu et al., ACL 2022,
  https://arxiv.org/abs/2110.07602; a prefix of keys and values in every layer
  (with ``prompt.prefix-projection``, through a trained MLP that travels too).

All of these tensors are averaged element-wise by every strategy.
"""

from __future__ import annotations

from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

from fedlora.config import RunConfig
from fedlora.methods.base import AdapterMethod, task_type


class PromptTuning(AdapterMethod):
    """Soft prompt: ``prompt.num-virtual-tokens`` trainable embeddings."""

    name = "prompt-tuning"

    def peft_config(self, cfg: RunConfig, task: str) -> PromptTuningConfig:
        """A peft ``PromptTuningConfig`` (random init)."""
        return PromptTuningConfig(task_type=task_type(task), num_virtual_tokens=cfg.prompt.num_virtual_tokens)


class PTuning(AdapterMethod):
    """Virtual tokens produced by a trained MLP encoder."""

    name = "p-tuning"

    def peft_config(self, cfg: RunConfig, task: str) -> PromptEncoderConfig:
        """A peft ``PromptEncoderConfig`` with an MLP encoder."""
        return PromptEncoderConfig(
            task_type=task_type(task),
            num_virtual_tokens=cfg.prompt.num_virtual_tokens,
            encoder_hidden_size=cfg.prompt.encoder_hidden_size,
        )


class PrefixTuning(AdapterMethod):
    """Trainable key/value prefixes in every layer."""

    name = "prefix-tuning"

    def peft_config(self, cfg: RunConfig, task: str) -> PrefixTuningConfig:
        """A peft ``PrefixTuningConfig``."""
        return PrefixTuningConfig(
            task_type=task_type(task),
            num_virtual_tokens=cfg.prompt.num_virtual_tokens,
            prefix_projection=cfg.prompt.prefix_projection,
            encoder_hidden_size=cfg.prompt.encoder_hidden_size,
        )
