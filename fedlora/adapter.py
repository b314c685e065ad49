"""Build the trainable adapter on a frozen base, and move its state in and out.

The adapter state is the model's trainable parameters, keyed by their names in
``model.named_parameters()`` (for example
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``):
the tensors that train are the tensors that travel, for every method
(:mod:`fedlora.methods`). Nothing frozen, and so nothing of the base, is ever
part of it. The final adapter is written with peft's ``save_pretrained``, so
peft's own file format is what users load.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from peft import PeftModel, get_peft_model
from torch import Tensor
from transformers import PreTrainedModel

from fedlora.config import RunConfig
from fedlora.methods import get_method
from fedlora.validation import check_state


def build_adapter_model(base: PreTrainedModel, cfg: RunConfig, task: str) -> PeftModel:
    """Wrap ``base`` with a fresh ``adapter.method`` adapter (initialised from torch's current RNG state)."""
    method = get_method(cfg.adapter.method)
    try:
        model = get_peft_model(base, method.peft_config(cfg, task))
    except ValueError as err:  # e.g. target modules not found in the base
        raise ValueError(f"cannot apply adapter.method='{method.name}' to this model: {err}") from err
    method.freeze(model)
    return model


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def adapter_state(model: torch.nn.Module) -> dict[str, Tensor]:
    """A detached CPU copy of every trainable tensor, keyed by parameter name."""
    return {name: p.detach().cpu().clone() for name, p in _trainable(model).items()}


def load_adapter_state(model: torch.nn.Module, state: Mapping[str, Tensor]) -> None:
    """Overwrite every trainable tensor of ``model`` with ``state`` (checked first: nothing stale survives)."""
    params = _trainable(model)
    check_state(state, params)
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)
