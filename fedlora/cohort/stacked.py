"""K clients' adapters stacked over one base model, so that one forward pass serves them all.

Multi-adapter serving (S-LoRA, Punica) batches requests of many adapters
through one base; mLoRA/ASPEN do it for training. Here every trainable tensor
of the peft model becomes one parameter of shape ``(K, *shape)``, slice ``k``
being client ``k``'s. A batch is laid out *client-major*: its rows are K equal
blocks, block ``k`` holding client ``k``'s samples. Forward hooks on the adapted
modules reshape a layer's input to ``(K, rows·tokens, features)`` and apply
each block's own factors with one batched matrix product (no loop over
clients), while peft's own adapter computation is switched off for the pass.

Because a block only ever meets its own slice, the gradient of client ``j``'s
slice from client ``i``'s loss is exactly zero, and a client's update equals
what it gets trained alone (up to float rounding; tests check 1e-5).

What can be stacked: LoRA factors of linear layers (A may be frozen and shared,
as in LoRA-FA, or zero-padded to a lower client rank, as with rank tiers),
DoRA's magnitude vectors, and linear heads that peft trains as
``modules_to_save``. :func:`blocker` names the first thing that cannot.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils.other import ModulesToSaveWrapper
from torch import Tensor, nn

from fedlora.adapter import trainable_names
from fedlora.keys import DORA_MAGNITUDE, HEAD_COPY, LORA_A, LORA_B, param_key

Hook = Callable[[nn.Module, tuple, Tensor], Tensor]


def _lora_sites(model: nn.Module) -> Iterator[tuple[str, LoraLayer, str]]:
    """(module name, layer, adapter) for each active LoRA adapter of a linear layer."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    yield name, module, adapter


def _head_sites(model: nn.Module) -> Iterator[tuple[str, ModulesToSaveWrapper, str]]:
    """(module name, wrapper, adapter) for each trained copy of a ``modules_to_save`` module."""
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            for adapter in module.active_adapters:
                if adapter in module.modules_to_save:
                    yield name, module, adapter


def blocker(model: PeftModel) -> str:
    """Why ``model``'s adapter cannot be stacked ("" if it can)."""
    if len(model.peft_config) > 1:
        return "the model holds several peft adapters (one per task), and clients activate different ones"
    covered = set()
    for name, layer, adapter in _lora_sites(model):
        if not isinstance(layer.lora_A[adapter], nn.Linear):
            return f"'{name}' is a {type(layer).__name__} whose factors are not linear layers (AdaLoRA's SVD triplets)"
        if not isinstance(layer.get_base_layer(), nn.Linear):  # bitsandbytes' 4- and 8-bit layers are nn.Linear too
            return f"'{name}' is a LoRA layer over {type(layer.get_base_layer()).__name__}, not a linear layer"
        covered |= {param_key(name, LORA_A, adapter), param_key(name, LORA_B, adapter)}
        if adapter in layer.lora_magnitude_vector:
            covered.add(param_key(name, DORA_MAGNITUDE, adapter))
    for name, wrapper, adapter in _head_sites(model):
        if type(wrapper.modules_to_save[adapter]) is not nn.Linear:
            return f"'{name}' trains a {type(wrapper.modules_to_save[adapter]).__name__}, not a linear head"
        head = wrapper.modules_to_save[adapter]
        covered |= {param_key(name, HEAD_COPY, adapter, p) for p, _ in head.named_parameters()}
    if uncovered := [n for n in trainable_names(model) if n not in covered]:
        return f"trainable tensor '{uncovered[0]}' is not a LoRA factor, DoRA magnitude or linear head"
    return ""


class StackedAdapter:
    """The trainable tensors of ``len(states)`` clients, stacked, and the hooks that route each block through its own.

    ``states`` are full adapter states (every trainable tensor of ``model``, at
    the model's shapes: lower ranks already zero-padded). The model's own
    adapter tensors are left untouched and unused while :meth:`applied` is active.
    """

    def __init__(self, model: PeftModel, states: list[Mapping[str, Tensor]]) -> None:
        if reason := blocker(model):
            raise ValueError(f"cannot stack this adapter: {reason}")
        self.model = model
        self.size = len(states)
        names = trainable_names(model)
        current = dict(model.named_parameters())
        self.params: dict[str, nn.Parameter] = {
            name: nn.Parameter(torch.stack([s[name] for s in states]).to(current[name].device, current[name].dtype))
            for name in names
        }
        self.frozen = current  # shared tensors (LoRA-FA's A) are read from the model itself

    def client_states(self) -> list[dict[str, Tensor]]:
        """Each client's trained tensors: detached CPU copies, keyed like :func:`fedlora.adapter.adapter_state`."""
        return [{name: p[k].detach().cpu().clone() for name, p in self.params.items()} for k in range(self.size)]

    def _get(self, key: str) -> Tensor:
        """Stacked ``(K, …)`` if trainable, else the shared tensor."""
        return self.params[key] if key in self.params else self.frozen[key]

    def _by_block(self, x: Tensor) -> Tensor:
        """``x`` (client-major rows first) as ``(K, everything else of a block, features)``."""
        return x.reshape(self.size, -1, x.shape[-1])

    def _lora_hook(self, name: str, layer: LoraLayer, adapter: str) -> Hook:
        a = self._get(param_key(name, LORA_A, adapter))
        b = self._get(param_key(name, LORA_B, adapter))
        scaling, dropout = layer.scaling[adapter], layer.lora_dropout[adapter]
        magnitude_key = param_key(name, DORA_MAGNITUDE, adapter)
        magnitude = self.params.get(magnitude_key) if adapter in layer.lora_magnitude_vector else None

        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            x = self._by_block(args[0])
            dropped = dropout(x)
            lora = (dropped @ a.to(x.dtype).transpose(-1, -2)) @ b.to(x.dtype).transpose(-1, -2)  # (K, n, out)
            base = self._by_block(output)
            if magnitude is None:
                return (base + lora * scaling).reshape(output.shape)
            return (base + self._dora(layer, x, dropped, base, lora, a, b, magnitude, scaling)).reshape(output.shape)

        return hook

    def _dora(
        self,
        layer: LoraLayer,
        x: Tensor,
        dropped: Tensor,
        base: Tensor,
        lora: Tensor,
        a: Tensor,
        b: Tensor,
        magnitude: Tensor,
        scaling: float,
    ) -> Tensor:
        """DoRA's term on top of the base output, per client (peft's ``DoraLinearLayer.forward``, batched).

        As in peft (and section 4.3 of the paper), the column norm of the
        adapted weight is a constant for the backward pass.
        """
        base_layer = layer.get_base_layer()
        weight = base_layer.weight.to(x.dtype)
        with torch.no_grad():
            adapted = weight + scaling * (b.to(x.dtype) @ a.to(x.dtype))  # (K, out, in)
            norm = torch.linalg.norm(adapted, dim=-1)  # (K, out)
        scale = (magnitude.to(x.dtype) / norm).unsqueeze(1)  # (K, 1, out)
        if dropped is x:  # no dropout: the base output (less its bias) is W·x already
            plain = base - base_layer.bias if base_layer.bias is not None else base
        else:
            plain = F.linear(dropped, weight)
        return (scale - 1) * plain + scale * lora * scaling

    def _head_hook(self, name: str, adapter: str, head: nn.Linear) -> Hook:
        weight = self.params[param_key(name, HEAD_COPY, adapter)]  # (K, out, in)
        bias = self.params.get(param_key(name, HEAD_COPY, adapter, "bias"))  # (K, out) or None

        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            x = self._by_block(args[0])
            out = x @ weight.to(x.dtype).transpose(-1, -2)
            if bias is not None:
                out = out + bias.to(x.dtype).unsqueeze(1)
            return out.reshape(*args[0].shape[:-1], head.out_features)

        return hook

    @contextmanager
    def applied(self) -> Iterator[None]:
        """While active, the model computes every block through its own client's adapter.

        peft's adapter layers are switched off (their ``_disable_adapters``
        flag, set directly: peft's ``enable_adapters`` would also reset which
        tensors require gradients) and a forward hook adds each block's update.
        """
        switched: list[nn.Module] = []
        handles = []
        try:
            for name, layer, adapter in _lora_sites(self.model):
                switched.append(layer)
                handles.append(layer.register_forward_hook(self._lora_hook(name, layer, adapter)))
            for name, wrapper, adapter in _head_sites(self.model):
                switched.append(wrapper)
                handles.append(
                    wrapper.register_forward_hook(self._head_hook(name, adapter, wrapper.modules_to_save[adapter]))
                )
            for module in switched:
                module._disable_adapters = True
            yield
        finally:
            for handle in handles:
                handle.remove()
            for module in switched:
                module._disable_adapters = False
