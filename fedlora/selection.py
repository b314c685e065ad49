"""A model whose trainable set each message chooses: full-parameter methods that train a different part every round.

LISA (:mod:`fedlora.methods.lisa`) trains whole base parameters, a different
set of layers each round. A message then holds three kinds of base
parameter, told apart by their keys (:mod:`fedlora.keys`):

* under its own name: it trains this round, and so it travels back;
* under ``<name>@frozen``: it is frozen this round but differs from the
  initial base (trained in an earlier round), so the party writes it into its
  base copy;
* absent: it is the initial base's, and a party whose copy holds something
  else (a cached worker model that served another message) restores it.

So whatever a cached model served before, after :func:`select` it is the
sender's model exactly, with exactly the parameters named plainly trainable:
no client depends on having seen earlier rounds. The initial values of the
selectable parameters are kept once per model (:func:`make_selectable`); only
parameters changed since are ever restored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from fedlora.keys import FROZEN, frozen_key, is_frozen
from fedlora.validation import InvalidUpdate

_INITIAL = "_fedlora_selectable"  # model attribute: parameter name -> its initial value
_CHANGED = "_fedlora_changed"  # model attribute: selectable parameters that may differ from their initial value


def make_selectable(model: torch.nn.Module, names: Iterable[str]) -> None:
    """Let messages choose which of ``names`` train; their current values are the initial base (copied once)."""
    params = dict(model.named_parameters())
    setattr(model, _INITIAL, {name: params[name].detach().clone() for name in names})
    setattr(model, _CHANGED, set())


def is_selectable(model: torch.nn.Module) -> bool:
    """Whether ``model``'s trainable set is chosen by each message (:func:`make_selectable` was called)."""
    return hasattr(model, _INITIAL)


def frozen_tensors(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The frozen base parameters of ``state``, under their own names."""
    return {key.removesuffix(FROZEN): tensor for key, tensor in state.items() if is_frozen(key)}


def select(model: torch.nn.Module, state: Mapping[str, Tensor]) -> None:
    """Make ``model`` the model ``state`` describes: its plain keys trainable, ``@frozen`` ones written, the rest reset.

    A model that is not selectable is left alone (a frozen tensor sent to it
    is an :class:`InvalidUpdate`). Frozen tensors are
    checked here (a name the model may select, its shape, finite values);
    the trainable ones are checked when they are loaded
    (:func:`fedlora.adapter.fit_state`: exactly the model's trainable set).
    Idempotent: selecting the same state twice leaves the same model.
    """
    if not is_selectable(model):
        if stray := [key for key in state if is_frozen(key)]:
            raise InvalidUpdate(f"frozen tensor '{stray[0]}' sent to a model whose trainable set is fixed")
        return
    initial: dict[str, Tensor] = getattr(model, _INITIAL)
    changed: set[str] = getattr(model, _CHANGED)
    params = dict(model.named_parameters())
    frozen = frozen_tensors(state)
    for name, tensor in frozen.items():
        if name not in initial:
            raise InvalidUpdate(f"frozen tensor '{frozen_key(name)}' is not a parameter this model can select")
        if tuple(tensor.shape) != tuple(initial[name].shape):
            raise InvalidUpdate(
                f"frozen tensor '{frozen_key(name)}' has shape {tuple(tensor.shape)}, "
                f"expected {tuple(initial[name].shape)}"
            )
        if not torch.isfinite(tensor).all():
            raise InvalidUpdate(f"frozen tensor '{frozen_key(name)}' contains NaN or Inf")
    with torch.no_grad():
        for name in initial:
            params[name].requires_grad_(name in state)
            if name in frozen:
                params[name].copy_(frozen[name])
            elif name in changed and name not in state:
                params[name].copy_(initial[name])
    changed.clear()
    changed.update(name for name in initial if name in state or name in frozen)
