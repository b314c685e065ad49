"""LoRAMoE / MoRAL: several LoRA experts per target module, mixed per token by a trained router.

Dou et al., "LoRAMoE: Alleviate World Knowledge Forgetting in Large Language
Models via MoE-Style Plugin", ACL 2024, https://arxiv.org/abs/2312.09979 (dense
softmax over the experts); Yang et al., "MoRAL: MoE Augmented LoRA for LLMs'
Lifelong Learning", 2024, https://arxiv.org/abs/2402.11260; the sparse top-k
routing is Shazeer et al.'s (https://arxiv.org/abs/1701.06538) as Mixtral uses
it. Each target layer computes

    h = W0·x + Σ_i g_i(x) · s·B_i·A_i·x,   g(x) = softmax over the top-k of R·x

with ``loramoe.experts`` experts of rank ``adapter.r`` and a router R
(``experts × in_features``, no bias); ``loramoe.top-k = experts`` is LoRAMoE's
dense mixture. The paper's auxiliary balancing loss is not added.

Built on peft: the experts are peft LoRA adapters of one model (``default``,
``expert-1``, …, :func:`fedlora.keys.expert_adapter`), all active; each
layer's router is a ``moe_router`` linear on the peft layer, and every expert's
output goes through peft's LoRA-variant hook (:class:`GatedExpert`, the hook
DoRA uses), which weights it by its gate. So every expert is an ordinary
factor pair on the wire, averaged per expert by any strategy (as factors or
as exact products), and the router is one more tensor averaged element-wise.
Every party builds experts and router from ``run.seed``, so expert i means the
same on every client and averaging keeps them aligned. A classification head is
one head of the whole mixture: it belongs to the first expert's adapter, where
peft would give every expert its own copy (:func:`share_head`).

peft's format holds the experts (its multi-adapter layout: expert 0 in the
folder, expert i in ``expert-i/``) but not the routers: they are saved beside
them in ``moe_router.safetensors`` with the expert count and top-k in its
metadata, and :meth:`LoraMoE.from_pretrained` loads the whole model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from peft import LoraConfig, PeftConfig, PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import LoraVariant
from peft.utils import ModulesToSaveWrapper, load_peft_weights, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import PreTrainedModel

from fedlora.config import RunConfig, opt
from fedlora.keys import ROUTER_MODULE, SHARED_ADAPTER, expert_adapter, is_router
from fedlora.methods.base import task_type
from fedlora.methods.lora import LORA_OPTIONS, Lora

MAX_EXPERTS = 64  # a router is experts × in_features; more experts than this is a typo, not a mixture


@dataclass(frozen=True)
class LoraMoeSettings:
    """Mixture of LoRA experts (``adapter.method='loramoe'``): experts of rank ``adapter.r`` and a router per layer."""

    section: ClassVar[str] = "loramoe"

    experts: int = opt(
        4, "LoRA experts per target module, each of rank `adapter.r`.", check=lambda v, _: 1 <= v <= MAX_EXPERTS
    )
    top_k: int = opt(
        2,
        "Experts each token is routed to (softmax over its top-k router logits); equal to `experts`: LoRAMoE's "
        "dense mixture.",
        check=lambda v, cfg: 1 <= v <= cfg.loramoe.experts,
    )


ROUTER_FILE = "moe_router.safetensors"
"""The saved adapter folder's file of router weights (peft's format has no place for them)."""


def route(logits: Tensor, top_k: int) -> Tensor:
    """Each token's gate per expert: a softmax over its ``top_k`` largest logits, zero for the others.

    With ``top_k`` equal to the number of experts this is the dense softmax of LoRAMoE.
    """
    if top_k < logits.shape[-1]:
        top = logits.topk(top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, top.indices, top.values)
    return logits.softmax(-1)


class GatedExpert(LoraVariant):
    """A peft LoRA variant: expert ``index``'s output ``s·B·A·dropout(x)`` weighted by its gate from the router."""

    def __init__(self, index: int, top_k: int) -> None:
        self.index = index
        self.top_k = top_k

    def supports_lora_conversion(self) -> bool:
        """A gated mixture is no single LoRA."""
        return False

    def forward(  # type: ignore[override]  # peft's variants are static; this one carries its index
        self, module: LoraLayer, active_adapter: str, x: Tensor, result: Tensor, **kwargs: Any
    ) -> Tensor:
        """``result`` plus this expert's gated update."""
        gate = route(getattr(module, ROUTER_MODULE)(x), self.top_k)[..., self.index : self.index + 1]
        update = module.lora_B[active_adapter](module.lora_A[active_adapter](module.lora_dropout[active_adapter](x)))
        return result + gate * update * module.scaling[active_adapter]


def share_head(model: PeftModel, adapter: str) -> None:
    """Drop expert ``adapter``'s copy of the classification head that peft adds to every adapter of a classifier.

    The mixture has one head, trained and sent with the first expert; peft also
    refuses to activate several adapters that each own a head copy.
    """
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            module.delete_adapter(adapter, new_active_adapters=[SHARED_ADAPTER])
    model.peft_config[adapter].modules_to_save = None


def install_routers(model: PeftModel, experts: int, top_k: int) -> None:
    """Give every LoRA layer of ``model`` a router over its ``experts`` adapters and make them all active, gated."""
    names = [expert_adapter(i) for i in range(experts)]
    model.base_model.set_adapter(names)
    for module in model.modules():
        if isinstance(module, LoraLayer) and SHARED_ADAPTER in module.lora_A:
            weight = module.lora_A[SHARED_ADAPTER].weight
            router = nn.Linear(module.in_features, experts, bias=False, device=weight.device, dtype=weight.dtype)
            setattr(module, ROUTER_MODULE, router)
            for index, name in enumerate(names):
                module.lora_variant[name] = GatedExpert(index, top_k)


class LoraMoE(Lora):
    """``loramoe.experts`` LoRA experts per target layer, mixed by a per-layer router."""

    name = "loramoe"
    settings = LoraMoeSettings
    uses = LORA_OPTIONS
    refused_strategies: ClassVar[Mapping[str, str]] = {
        "flora": "FLoRA merges each layer's update B·A into the base ungated, but an expert's update is gated",
        "adalora-merge": "the experts are LoRA pairs, not AdaLoRA triplets",
        "mtlora": "the experts are not per-task adapters",
    }

    def add_adapters(self, model: PeftModel, cfg: RunConfig, task: str) -> None:
        """Add the experts after the first, then a router on each layer (all seeded by ``run.seed``)."""
        for index in range(1, cfg.loramoe.experts):
            model.add_adapter(expert_adapter(index), LoraConfig(task_type=task_type(task), **self.lora_kwargs(cfg)))
            share_head(model, expert_adapter(index))
        install_routers(model, cfg.loramoe.experts, cfg.loramoe.top_k)

    def save_extra(self, model: PeftModel, folder: Path) -> None:
        """The routers, with the expert count and top-k as metadata, in ``moe_router.safetensors``."""
        routers = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if is_router(name)}
        variant = next(m for m in model.modules() if hasattr(m, ROUTER_MODULE)).lora_variant[SHARED_ADAPTER]
        metadata = {"experts": str(len(model.peft_config)), "top-k": str(variant.top_k)}
        save_file(routers, folder / ROUTER_FILE, metadata)

    def wrote(self, folder: Path) -> bool:
        """Whether ``folder`` holds routers."""
        return (folder / ROUTER_FILE).is_file()

    def from_pretrained(self, base: PreTrainedModel, folder: Path) -> PeftModel:
        """The experts with peft's loader, then the routers from ``moe_router.safetensors``."""
        with safe_open(str(folder / ROUTER_FILE), "pt") as file:
            metadata = file.metadata()
        experts, top_k = int(metadata["experts"]), int(metadata["top-k"])
        model = PeftModel.from_pretrained(base, folder)
        for index in range(1, experts):
            name = expert_adapter(index)  # peft's load_adapter would look for a head copy in the expert's folder
            model.add_adapter(name, PeftConfig.from_pretrained(folder / name))
            share_head(model, name)
            set_peft_model_state_dict(model, load_peft_weights(folder / name), adapter_name=name)
        install_routers(model, experts, top_k)
        routers = load_file(folder / ROUTER_FILE)
        expected = {name for name, _ in model.named_parameters() if is_router(name)}
        if set(routers) != expected:
            raise ValueError(f"{folder / ROUTER_FILE} does not hold this model's routers")
        model.load_state_dict(routers, strict=False)
        return model
