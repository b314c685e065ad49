"""Build the trainable adapter on a frozen base, and move its state in and out.

The adapter state is the model's trainable parameters, keyed by their names in
``model.named_parameters()`` (for example
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``):
the tensors that train are the tensors that travel, for every method
(:mod:`fedlora.methods`). Nothing frozen, and so nothing of the base, is ever
part of it. The final adapter is written with peft's ``save_pretrained``, so
peft's own file format is what users load.

A message may also carry *base tensors* (:func:`fedlora.keys.is_base_tensor`):
what a strategy has the parties write into their frozen base instead of
training, never sent back. Each kind gets into the base, and into the saved
adapter, through its :class:`BaseHook` in :data:`BASE_HOOKS`; this module knows
nothing of what they hold.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch
from peft import PeftModel
from torch import Tensor
from transformers import PreTrainedModel

from fedlora.aggregation import resize_rank
from fedlora.config import RunConfig
from fedlora.keys import lora_pairs, trained_part
from fedlora.methods import get_method
from fedlora.residual import RESIDUAL
from fedlora.selection import select
from fedlora.validation import check_state


class BaseHook(Protocol):
    """How one kind of base tensor gets into a party's frozen base, and into the adapter saved from it."""

    def load(self, model: torch.nn.Module, state: Mapping[str, Tensor]) -> None:
        """Write ``state``'s base tensors of this kind into ``model``'s base; without any, undo what it wrote before.

        Raises :class:`fedlora.validation.InvalidUpdate` for base tensors that do not fit the model.
        """
        ...

    def save(self, model: PeftModel, folder: Path) -> bool:
        """Write ``model``'s adapter folder if its base holds tensors of this kind (True); else nothing (False)."""
        ...


BASE_HOOKS: tuple[BaseHook, ...] = (RESIDUAL,)
"""Every kind of base tensor a message may carry: the residual of FLoRA and Delta-LoRA (:mod:`fedlora.residual`).

LISA's ``@frozen`` layers are not here: they also choose what trains, so
:func:`fedlora.selection.select` applies them before anything else is read.
"""


def build_adapter_model(base: PreTrainedModel, cfg: RunConfig, task: str) -> PeftModel:
    """Wrap ``base`` with a fresh ``adapter.method`` adapter (initialised from torch's current RNG state)."""
    method = get_method(cfg.adapter.method)
    try:
        model = method.wrap(base, cfg, task)
    except ValueError as err:  # e.g. target modules not found in the base
        raise ValueError(f"cannot apply adapter.method='{method.name}' to this model: {err}") from err
    method.add_adapters(model, cfg, task)
    method.freeze(model)
    return model


def drop_base_weights(model: PeftModel) -> None:
    """Replace every parameter of the frozen base by an empty one on the meta device (no memory).

    What is left is the adapter on the base's structure: enough to load a global
    adapter into (:func:`load_adapter_state`, base tensors included) and to write
    it with peft's ``save_pretrained``, neither of which reads a base weight;
    the model can no longer run. A parameter is the adapter's when it trains or
    peft named it after one of the model's adapters (``….lora_A.default.weight``,
    ``….modules_to_save.default.…``), frozen or not (LoRA-FA's shared A).
    """
    adapters = set(getattr(model, "peft_config", {}))  # a full-parameter method's model (LISA) has none
    for module_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if not param.requires_grad and not adapters & set(f"{module_name}.{name}".split(".")):
                module.register_parameter(
                    name, torch.nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"), False)
                )


def trainable_names(model: torch.nn.Module) -> list[str]:
    """The keys of :func:`adapter_state`, without copying any tensor."""
    return list(_trainable(model))


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def adapter_state(model: torch.nn.Module) -> dict[str, Tensor]:
    """A detached CPU copy of every trainable tensor, keyed by parameter name."""
    return {name: p.detach().cpu().clone() for name, p in _trainable(model).items()}


def resize_state(state: Mapping[str, Tensor], rank: int) -> dict[str, Tensor]:
    """``state`` with every LoRA factor pair cut or zero-padded to ``rank`` (other tensors unchanged).

    A client of rank ``r_k`` loads its factors zero-padded into the worker's
    rank-``r`` adapter: the padded rows of A and columns of B see exactly zero
    gradient (each multiplies the other's zeros), so they stay zero and training
    is that of a rank-``r_k`` adapter with the global scaling, on one cached model.
    """
    out = dict(state)
    for a_key, b_key in lora_pairs(state).values():
        out[b_key], out[a_key] = resize_rank(state[b_key], state[a_key], rank)
    return out


def resize_like(state: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with each LoRA factor pair cut or zero-padded to its rank in ``reference``."""
    out = dict(state)
    for a_key, b_key in lora_pairs(state).values():
        if a_key in reference:
            out[b_key], out[a_key] = resize_rank(state[b_key], state[a_key], reference[a_key].shape[0])
    return out


def fit_state(model: torch.nn.Module, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state``'s trainable tensors (not its base tensors) at ``model``'s shapes, checked against the model.

    LoRA factors of a lower rank are zero-padded (:func:`resize_state`);
    anything else that does not match the model's trainable tensors exactly is
    an :class:`InvalidUpdate`.
    """
    trainable = trained_part(state)
    params = _trainable(model)
    pairs = [a for a, _ in lora_pairs(trainable).values() if a in params]
    if all(trainable[a].shape[0] <= params[a].shape[0] for a in pairs):  # a lower-rank client's, zero-padded
        trainable = resize_like(trainable, params)
    check_state(trainable, params)
    return trainable


def load_base_tensors(model: torch.nn.Module, state: Mapping[str, Tensor]) -> None:
    """Write ``state``'s base tensors into ``model``'s base, each kind by its hook (:data:`BASE_HOOKS`)."""
    for hook in BASE_HOOKS:
        hook.load(model, state)


def load_adapter_state(model: torch.nn.Module, state: Mapping[str, Tensor]) -> None:
    """Overwrite every trainable tensor of ``model`` with ``state`` (checked first: nothing stale survives).

    LoRA factors of a lower rank are zero-padded (:func:`fit_state`); base
    tensors are written into the base (:func:`load_base_tensors`), and without
    any, those written earlier are removed. A model whose trainable set each
    message chooses (LISA) is first set to ``state``'s (:func:`fedlora.selection.select`).
    """
    select(model, state)
    trainable = fit_state(model, state)
    params = _trainable(model)
    load_base_tensors(model, state)
    with torch.no_grad():
        for name, tensor in trainable.items():
            params[name].copy_(tensor)


def save_adapter_files(model: PeftModel, folder: Path, adapters: list[str] | None = None) -> None:
    """``model.save_pretrained(folder)``, unless a :class:`BaseHook` writes it (its base holds base tensors).

    ``adapters`` selects peft adapters to save (default: all). A hook writes
    one plain adapter that ``PeftModel.from_pretrained`` loads onto the
    original base to give exactly this model (:func:`fedlora.residual.save_stacked`).
    """
    if not isinstance(model, PeftModel):  # a full-parameter method's model (LISA): a transformers model folder
        model.save_pretrained(folder)
        return
    if not any(hook.save(model, folder) for hook in BASE_HOOKS):
        model.save_pretrained(folder, selected_adapters=adapters)
