"""LISA: full-parameter training of a few sampled decoder layers per round, plus the embeddings and the head.

Pan et al., "LISA: Layerwise Importance Sampling for Memory-Efficient Large
Language Model Fine-Tuning", NeurIPS 2024, https://arxiv.org/abs/2403.17919.
Not a peft adapter: the model is the base itself, and what trains is its own
weights. Every period the paper unfreezes γ uniformly sampled layers
(``lisa.layers``) and keeps the embeddings and the head always trainable;
like its reference implementation (LMFlow) everything outside the decoder
layers trains, so also the final norm. A tied head is the embedding matrix,
one parameter, trained and sent once.

Federated (:mod:`strategies.lisa`): the server samples the round's layers
(:mod:`fedlora.layerwise`), sends them and everything outside the layers
under their own names and every other layer it has changed before as a
frozen tensor, and averages what comes back. A client's model is
:func:`fedlora.selection.select`-ed by each message: the plainly named
parameters train, the frozen ones are written into the base, the rest are
the initial base's, so a cached worker model is the server's model again
whatever it served before. The optimizer (``train.optimizer``, AdamW by
default) is made afresh every round over exactly the trainable parameters:
the paper's reset of the optimizer state at each period's switch.

The output is a transformers model folder (``save_pretrained``) with a
``lisa.json`` marker; ``AutoModelForCausalLM.from_pretrained(folder)`` loads it
without fedlora, and :meth:`Lisa.from_pretrained` loads it onto a given base.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from safetensors.torch import load_file
from transformers import PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_NAME

from fedlora.config import ConfigError, RunConfig, opt
from fedlora.layerwise import num_layers
from fedlora.methods.base import AdapterMethod
from fedlora.selection import make_selectable

MARKER = "lisa.json"
"""The file beside the model weights that says a folder is LISA's output (and which layers it has)."""


@dataclass(frozen=True)
class LisaSettings:
    """LISA (``adapter.method='lisa'``, with ``strategy.name='lisa'``): γ sampled layers train fully each period."""

    section: ClassVar[str] = "lisa"
    layers: int = opt(
        2,
        "γ: decoder layers sampled to train (all their weights) each period, beside the embeddings, final norm and "
        "head, which always train.",
        check=lambda v, _: v >= 1,
    )
    period: int = opt(
        1,
        "Rounds between two samplings of the layers (the paper's sampling period K, in rounds).",
        check=lambda v, _: v >= 1,
    )


class Lisa(AdapterMethod):
    """The base model itself; which layers train is chosen by every message."""

    name = "lisa"
    settings = LisaSettings
    uses = frozenset({"train.epochs"})  # not model.load-in-8bit: LISA trains the base weights, which cannot be 8-bit
    strategy = "lisa"  # the server samples the round's layers
    refused_settings: ClassVar[Mapping[str, str]] = {
        "wire.dtype": "every layer LISA trains would be rounded to float16 for good, unlike the layers never sent",
        "train.keep-optimizer-state": "the trainable layers change every round (LISA resets the optimizer state)",
        "cohort.clients": "a cohort's batched pass stacks adapters over one base, and LISA trains the base itself",
    }

    def wrap(self, base: PreTrainedModel, cfg: RunConfig, task: str) -> PreTrainedModel:  # type: ignore[override]
        """``base`` unwrapped; ``lisa.layers`` must not exceed its layers."""
        layers = num_layers(dict(base.named_parameters()))
        if not 1 <= cfg.lisa.layers <= layers:
            raise ConfigError(f"lisa.layers={cfg.lisa.layers}, but the model has {layers} decoder layers")
        return base

    def freeze(self, model: PreTrainedModel) -> None:  # type: ignore[override]
        """Every parameter may train; each message chooses (the model as built holds them all trainable)."""
        model.requires_grad_(True)
        make_selectable(model, (name for name, _ in model.named_parameters()))

    def save_extra(self, model: PreTrainedModel, folder: Path) -> None:  # type: ignore[override]
        """The marker: the model's number of layers (the folder is otherwise a plain transformers model)."""
        info = {"method": self.name, "layers": num_layers(dict(model.named_parameters()))}
        (folder / MARKER).write_text(json.dumps(info, indent=2))

    def wrote(self, folder: Path) -> bool:
        """Whether ``folder`` is LISA's output."""
        return (folder / MARKER).is_file()

    def from_pretrained(self, base: PreTrainedModel, folder: Path) -> PreTrainedModel:  # type: ignore[override]
        """``base`` with every weight of the saved model (a tied head comes with its embedding matrix)."""
        saved = load_file(folder / SAFE_WEIGHTS_NAME)
        result = base.load_state_dict(saved, strict=False)
        params = dict(base.named_parameters())  # a tied head is not listed apart from the embeddings
        missing = [k for k in result.missing_keys if k in params]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"{folder} does not fit this base: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
            )
        return base.requires_grad_(False)
