"""Build the trainable adapter on a frozen base, and move its state in and out.

The adapter state is exactly what peft saves in ``adapter_model.safetensors``
(``get_peft_model_state_dict``): the LoRA factors plus, for classification, the
new head that peft trains through ``modules_to_save``. Nothing of the frozen
base is ever part of it. :func:`build_adapter_model` checks that promise: the
state holds every trainable parameter and nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import Tensor
from transformers import PreTrainedModel

from fedlora.config import AdapterSettings
from fedlora.models import CLASSIFICATION
from fedlora.validation import check_state


def lora_config(settings: AdapterSettings, task: str) -> LoraConfig:
    """Peft ``LoraConfig`` for the run's adapter settings."""
    targets = [m.strip() for m in settings.target_modules.split(",") if m.strip()] or None
    return LoraConfig(
        task_type=TaskType.SEQ_CLS if task == CLASSIFICATION else TaskType.CAUSAL_LM,
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
    )


def build_adapter_model(base: PreTrainedModel, settings: AdapterSettings, task: str) -> PeftModel:
    """Wrap ``base`` with a fresh adapter (initialised from torch's current RNG state)."""
    try:
        model = get_peft_model(base, lora_config(settings, task))
    except ValueError as err:  # e.g. target modules not found in the base
        raise ValueError(f"cannot apply adapter.method='{settings.method}' to this model: {err}") from err
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    in_state = sum(t.numel() for t in adapter_state(model).values())
    if trainable != in_state:
        raise RuntimeError(f"adapter state holds {in_state} values but the model trains {trainable}")
    return model


def adapter_state(model: PeftModel) -> dict[str, Tensor]:
    """A detached copy of the adapter's trainable tensors, keyed as in peft's adapter file."""
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: PeftModel, state: Mapping[str, Tensor]) -> None:
    """Overwrite every adapter tensor of ``model`` with ``state`` (checked first: nothing stale survives)."""
    check_state(state, get_peft_model_state_dict(model))
    with torch.no_grad():
        set_peft_model_state_dict(model, dict(state))
