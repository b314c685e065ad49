"""Build the trainable adapter on a frozen base, and move its state in and out.

The adapter state is the model's trainable parameters, keyed by their names in
``model.named_parameters()`` (for example
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``):
the tensors that train are the tensors that travel, for every method
(:mod:`fedlora.methods`). Nothing frozen, and so nothing of the base, is ever
part of it. The final adapter is written with peft's ``save_pretrained``, so
peft's own file format is what users load.

A global adapter may also carry a *residual* per LoRA layer
(``<module>.residual_B``/``<module>.residual_A``, d×R and R×k): an update the
server has already aggregated for good, which a party adds to its frozen base
weight instead of training it (FLoRA, :mod:`strategies.flora`). Residuals are
never trainable and never sent back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import save_file
from torch import Tensor
from transformers import PreTrainedModel

from fedlora.aggregation import resize_rank
from fedlora.config import RunConfig
from fedlora.keys import LORA_A, LORA_B, lora_pairs, module_of
from fedlora.methods import get_method
from fedlora.residual import merged_residual, set_residual, split_residual
from fedlora.selection import select
from fedlora.validation import check_state


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
    adapter into (:func:`load_adapter_state`, a residual included) and to write
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


def fit_state(
    model: torch.nn.Module, state: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]:
    """``state`` as (trainable tensors at ``model``'s shapes, residual), checked against the model.

    LoRA factors of a lower rank are zero-padded (:func:`resize_state`);
    anything else that does not match the model's trainable tensors exactly is
    an :class:`InvalidUpdate`.
    """
    trainable, residual = split_residual(state)
    params = _trainable(model)
    pairs = [a for a, _ in lora_pairs(trainable).values() if a in params]
    if all(trainable[a].shape[0] <= params[a].shape[0] for a in pairs):  # a lower-rank client's, zero-padded
        trainable = resize_like(trainable, params)
    check_state(trainable, params)
    return trainable, residual


def load_adapter_state(model: torch.nn.Module, state: Mapping[str, Tensor]) -> None:
    """Overwrite every trainable tensor of ``model`` with ``state`` (checked first: nothing stale survives).

    LoRA factors of a lower rank are zero-padded (:func:`fit_state`); residual
    tensors are merged into the base weights (:func:`set_residual`), and
    without any, a residual merged earlier is removed. A model whose trainable
    set each message chooses (LISA) is first set to ``state``'s (:func:`fedlora.selection.select`).
    """
    select(model, state)
    trainable, residual = fit_state(model, state)
    params = _trainable(model)
    set_residual(model, residual)
    with torch.no_grad():
        for name, tensor in trainable.items():
            params[name].copy_(tensor)


def save_adapter_files(model: PeftModel, folder: Path, adapters: list[str] | None = None) -> None:
    """``model.save_pretrained(folder)``, or with a merged residual one LoRA adapter holding residual + adapter.

    ``adapters`` selects peft adapters to save (default: all). The residual
    ``B_res·A_res`` and the adapter ``s·B·A`` of each layer are stacked into
    factors of rank R (the largest over layers, zero-padded) saved with
    ``lora_alpha = r = R``, so peft's scaling is 1 and
    ``PeftModel.from_pretrained`` computes exactly the model trained here.
    """
    if not isinstance(model, PeftModel):  # a full-parameter method's model (LISA): a transformers model folder
        model.save_pretrained(folder)
        return
    residual = merged_residual(model)
    if not residual:
        model.save_pretrained(folder, selected_adapters=adapters)
        return
    modules = dict(model.named_modules())
    adapter = model.active_adapter
    saved = get_peft_model_state_dict(model)
    stacked = {}
    for a_key, _ in lora_pairs(_trainable(model)).values():
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
