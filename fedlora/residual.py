"""The residual a party's base weights hold: an aggregated update merged into the frozen base (FLoRA, Delta-LoRA).

A residual is ``module -> (B, A)`` per adapted module (d×R and R×k). The model
records, in factors, what it has merged, so a cached model serving many
messages moves its base from one residual to the next by the difference alone,
never keeping a copy of its base weights.

This module is the residual's only home. The generic code sees residual
factors only as *base tensors* of a message (:func:`fedlora.keys.is_base_tensor`:
written into the base, never trained nor sent back) and reaches this module
through one hook, :data:`RESIDUAL` (a :class:`fedlora.adapter.BaseHook`): it
merges a message's residual into the base when the adapter is loaded, and
writes the saved adapter with the residual stacked into its LoRA factors. It
imports no method, so methods (Delta-LoRA's step hook) use it without importing
the method registry back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import save_file
from torch import Tensor

from fedlora.aggregation import resize_rank
from fedlora.keys import LORA_A, LORA_B, RESIDUAL_A, RESIDUAL_B, is_frozen, is_residual, lora_pairs, module_of
from fedlora.validation import InvalidUpdate

_MERGED = "_fedlora_residual"  # model attribute: the residual now added to the base weights


def split_residual(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]:
    """``state`` as (trainable tensors, residual ``module -> (B, A)``); frozen base tensors (LISA's) are in neither."""
    trainable = {k: v for k, v in state.items() if not is_residual(k) and not is_frozen(k)}
    residual = {}
    for key in state:
        if key.endswith(RESIDUAL_A):
            module = key.removesuffix(RESIDUAL_A)
            if module + RESIDUAL_B not in state:
                raise InvalidUpdate(f"residual '{key}' has no matching '{module + RESIDUAL_B}'")
            residual[module] = (state[module + RESIDUAL_B], state[key])
    if len(residual) * 2 != sum(map(is_residual, state)):
        raise InvalidUpdate("a residual B has no matching residual A")
    return trainable, residual


def set_residual(model: torch.nn.Module, residual: Mapping[str, tuple[Tensor, Tensor]]) -> None:
    """Make each adapted module's base weight ``W0 + B·A`` for its residual, and plain ``W0`` for the others.

    Only the difference to what is merged now is applied, so a cached model
    serving many messages never needs a copy of its base weights.
    """
    modules = dict(model.named_modules())
    merged: dict[str, tuple[Tensor, Tensor]] = getattr(model, _MERGED, {})
    with torch.no_grad():
        for module in set(merged) | set(residual):
            if module not in modules or not hasattr(modules[module], "base_layer"):
                raise InvalidUpdate(f"residual for '{module}', which is not an adapted module of this model")
            weight = modules[module].base_layer.weight
            if not weight.dtype.is_floating_point:
                raise ValueError(f"cannot merge a residual into the quantised weight of '{module}'; use a float base")
            delta = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if module in residual:
                b, a = residual[module]
                if (b.shape[0], a.shape[1]) != tuple(weight.shape) or b.shape[1] != a.shape[0]:
                    raise InvalidUpdate(
                        f"residual of '{module}' is {tuple(b.shape)}·{tuple(a.shape)}, weight is {tuple(weight.shape)}"
                    )
                delta += b.float().to(weight.device) @ a.float().to(weight.device)
            if module in merged:
                b, a = merged[module]
                delta -= b.to(weight.device) @ a.to(weight.device)
            weight += delta.to(weight.dtype)
    setattr(model, _MERGED, {m: (b.float().clone(), a.float().clone()) for m, (b, a) in residual.items()})


def merged_residual(model: torch.nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """The residual ``module -> (B, A)`` the base weights hold now (what :func:`set_residual` merged last)."""
    return dict(getattr(model, _MERGED, {}))


def add_to_base(
    model: torch.nn.Module, updates: Mapping[str, tuple[Tensor, Tensor]], held: Mapping[str, tuple[Tensor, Tensor]]
) -> None:
    """Add each module's low-rank update ``B·A`` to its base weight; ``held`` is the residual the base now holds.

    Delta-LoRA moves the base during local training. ``held`` (the caller's
    exact account of what is merged, in factors) is what the next
    :func:`set_residual` takes out again, so a cached model serving the next
    client returns to its plain base without a copy of the base weights.
    """
    modules = dict(model.named_modules())
    with torch.no_grad():
        for module, (b, a) in updates.items():
            weight = modules[module].base_layer.weight
            weight += (b.float().to(weight.device) @ a.float().to(weight.device)).to(weight.dtype)
    setattr(model, _MERGED, {m: (b.detach().float().clone(), a.detach().float().clone()) for m, (b, a) in held.items()})


def save_stacked(model: PeftModel, folder: Path, residual: Mapping[str, tuple[Tensor, Tensor]]) -> None:
    """``model``'s adapter with ``residual`` stacked in, as one plain LoRA adapter folder (peft's format).

    The residual ``B_res·A_res`` and the adapter ``s·B·A`` of each layer are
    stacked into factors of rank R (the largest over layers, zero-padded) saved
    with ``lora_alpha = r = R``, so peft's scaling is 1 and
    ``PeftModel.from_pretrained`` computes exactly the model trained here.
    """
    modules = dict(model.named_modules())
    adapter = model.active_adapter
    saved = get_peft_model_state_dict(model)
    stacked = {}
    trainable = (name for name, p in model.named_parameters() if p.requires_grad)
    for a_key, _ in lora_pairs(trainable).values():
        module = module_of(a_key)
        scaling = modules[module].scaling[adapter]
        b, a = (
            modules[module].lora_B[adapter].weight.detach().cpu(),
            modules[module].lora_A[adapter].weight.detach().cpu(),
        )
        if module in residual:
            b, a = torch.cat([residual[module][0], scaling * b], 1), torch.cat([residual[module][1], a], 0)
        else:
            b = scaling * b
        stacked[module] = (b, a)
    rank = max(a.shape[0] for _, a in stacked.values())
    for module, (b, a) in stacked.items():
        b, a = resize_rank(b, a, rank)
        saved[f"{module}{LORA_B}weight"], saved[f"{module}{LORA_A}weight"] = b.contiguous(), a.contiguous()
    model.save_pretrained(folder)  # the config, README and any modules_to_save, then the factors replaced
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(r=rank, lora_alpha=rank, rank_pattern={}, alpha_pattern={})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in saved.items()}, folder / "adapter_model.safetensors", {"format": "pt"})


class ResidualHook:
    """The residual as a :class:`fedlora.adapter.BaseHook`: merged into the base on load, stacked in on save."""

    def load(self, model: torch.nn.Module, state: Mapping[str, Tensor]) -> None:
        """Merge ``state``'s residual into ``model``'s base (:func:`set_residual`); none: remove a merged one."""
        set_residual(model, split_residual(state)[1])

    def save(self, model: PeftModel, folder: Path) -> bool:
        """With a residual merged into the base, write the stacked adapter (:func:`save_stacked`); else nothing."""
        residual = merged_residual(model)
        if residual:
            save_stacked(model, folder, residual)
        return bool(residual)


RESIDUAL = ResidualHook()
"""The hook :mod:`fedlora.adapter` registers for residual base tensors."""
