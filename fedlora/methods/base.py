"""What every adapter method provides, and the one rule the federation relies on.

The rule: **the tensors that train are the tensors that travel.** After
:meth:`AdapterMethod.freeze`, the parameters with ``requires_grad`` are exactly
what a client sends and the server aggregates, keyed by their parameter names.
Anything a method shares without sending (LoRA-FA's A, VeRA's random
projections) is regenerated from the run's seed on every party.

How tensors aggregate follows from their names, so strategies need no
per-method code: a LoRA factor pair ``….lora_A.<adapter>.weight`` /
``….lora_B.<adapter>.weight`` is one low-rank update that product-averaging
strategies treat as such (:func:`fedlora.keys.lora_pairs`); every other
tensor (a lone factor, a DoRA magnitude, VeRA's scaling vectors, virtual-token
embeddings, a classification head) is averaged element-wise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from peft import PeftConfig, PeftModel, TaskType, get_peft_model, prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig, PreTrainedModel

from fedlora.config import RunConfig
from fedlora.models import CAUSAL_LM, FULL_PRECISION_MODULES, load_base_model
from fedlora.training import make_optimizer, trainable_parameters


def task_type(task: str) -> TaskType:
    """The peft task type for a fedlora task (classification and reward models have a sequence-classification head)."""
    return TaskType.CAUSAL_LM if task == CAUSAL_LM else TaskType.SEQ_CLS


class AdapterMethod:
    """A method: its peft config, plus the hooks where it departs from plain LoRA training."""

    name: ClassVar[str]

    settings: ClassVar[type[Any] | None] = None
    """The method's own run-config section: a frozen dataclass of :func:`fedlora.config.opt` fields whose
    ``section`` class attribute names it (``qlora`` → ``qlora.double-quant``, …); ``None``: it has none.

    Validation, defaults, ``docs/configuration.md``, ``pyproject.toml``'s check, the
    checkpoint fingerprint and the worker's model cache all read it from here."""

    uses: ClassVar[frozenset[str]] = frozenset({"model.load-in-8bit", "train.epochs"})
    """The shared method-scoped options (declared ``scoped=True`` in :mod:`fedlora.config`) it reads.

    Any other scoped option set away from its default is refused naming the key."""

    strategy: ClassVar[str | None] = None
    """The one strategy whose federated meaning this method needs (and that serves no other method), if any."""

    refused_strategies: ClassVar[Mapping[str, str]] = {}
    """Built-in strategies that cannot aggregate this method, each with why (refused naming ``strategy.name``)."""

    refused_settings: ClassVar[Mapping[str, str]] = {}
    """Run-config keys that do not apply to this method at any value but their default, each with why."""

    def check(self, cfg: RunConfig) -> dict[str, bool]:
        """Range checks this method adds to shared keys, ``key: in range`` (default: none)."""
        return {}

    def peft_config(self, cfg: RunConfig, task: str) -> PeftConfig:
        """The peft config that wraps the base model."""
        raise NotImplementedError

    def wrap(self, base: PreTrainedModel, cfg: RunConfig, task: str) -> PeftModel:
        """The model that trains: ``base`` wrapped by peft with :meth:`peft_config` (LISA: ``base`` itself)."""
        return get_peft_model(base, self.peft_config(cfg, task))

    def load_base(self, path: Path, task: str, num_labels: int, cfg: RunConfig) -> PreTrainedModel:
        """The frozen base model: float32, or 8-bit with ``model.load-in-8bit`` (QLoRA quantises it to 4 bits).

        8-bit is bitsandbytes' LLM.int8() (Dettmers et al., 2022,
        https://arxiv.org/abs/2208.07339), heads kept in full precision; peft's
        ``prepare_model_for_kbit_training`` then puts the remaining float
        parameters (norms) in float32. Gradient checkpointing is
        ``train.gradient-checkpointing``'s to decide (:func:`fedlora.runtime.workbench`), not peft's.
        """
        if not cfg.model.load_in_8bit:
            return load_base_model(path, task, num_labels)
        int8 = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=FULL_PRECISION_MODULES)
        model = load_base_model(path, task, num_labels, quantization=int8)
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

    def add_adapters(self, model: PeftModel, cfg: RunConfig, task: str) -> None:
        """Add further peft adapters after the first one (default: none; MTLoRA adds one per task)."""

    def activate(self, model: PeftModel, task: str) -> None:
        """Make ``task``'s adapters the active, trainable ones ("": all of them; default: nothing to do)."""

    def task_adapters(self, task: str) -> list[str]:
        """The peft adapters that make up ``task``'s model, saved in a folder of their own after the run.

        Default: none, so no per-task folder (one adapter serves every task, as with
        ``local-only`` or a global LoRA over ``data.tasks``); MTLoRA: its shared and task LoRA.
        """
        return []

    def freeze(self, model: PeftModel) -> None:
        """Freeze what peft leaves trainable but the method shares instead of training (default: nothing)."""

    def optimizer(self, model: PeftModel, cfg: RunConfig, lr: float) -> torch.optim.Optimizer:
        """The local optimizer for one round (default: ``train.optimizer`` over the trainable parameters)."""
        return make_optimizer(trainable_parameters(model), cfg.train, lr)

    def step_hook(self, model: PeftModel, cfg: RunConfig, server_round: int) -> Callable[[int], None] | None:
        """What runs after each local optimizer step of round ``server_round`` (default: nothing)."""
        return None

    def train_layers(self, model: PeftModel, layers: list[str] | None) -> None:
        """Train only the LoRA layers ``layers`` (module names); ``None``: every layer, as built.

        The server names the layers in a training instruction (``trainable-layers``) when it trains a subset
        (LoRA-drop); the client calls this before loading the received tensors. Default: all layers, always.
        """
        if layers is not None:
            raise ValueError(f"adapter.method='{self.name}' trains every layer, but the server sent a layer subset")

    def layer_importance(self, model: PeftModel, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, float]:
        """Each LoRA layer's importance measured on ``batches``, keyed by module name (default: none to measure)."""
        raise ValueError(f"adapter.method='{self.name}' measures no layer importance, but the server asked for it")

    def rank_pattern(self, model: PeftModel) -> dict[str, list[bool]]:
        """Which rank indices of each layer are in use, keyed by tensor name (default: all, reported as ``{}``)."""
        return {}

    def save_extra(self, model: PeftModel, folder: Path) -> None:
        """Write into a saved adapter ``folder`` what peft's ``save_pretrained`` cannot express (default: nothing)."""

    def wrote(self, folder: Path) -> bool:
        """Whether ``folder`` holds this method's :meth:`save_extra` files (default: it writes none)."""
        return False

    def from_pretrained(self, base: PreTrainedModel, folder: Path) -> PeftModel:
        """A saved adapter ``folder`` on ``base``, as the server last evaluated it (default: peft's own loader)."""
        return PeftModel.from_pretrained(base, folder)
