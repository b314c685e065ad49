"""MTLoRA: a task-agnostic LoRA shared by every task, plus a task-specific LoRA per task.

Agiza et al., "MTLoRA: Low-Rank Adaptation Approach for Efficient Multi-Task
Learning", CVPR 2024, https://arxiv.org/abs/2403.20320. The paper's
task-agnostic modules sit everywhere and its task-specific ones at the end of
each backbone stage. A decoder LM has one stage, so here the task-agnostic
LoRA ("default") is on ``adapter.target-modules`` of every layer and each task's
LoRA ("task-<name>", :func:`fedlora.keys.task_adapter`) on ``mtlora.task-modules`` of the last
``mtlora.task-layers`` layers, where the representation turns task-specific.

Built with peft's multi-adapter support: all adapters live in one model; a
client of task t activates "default" and "task-t" (:meth:`MTLora.activate`),
so exactly those train and travel, and inference for task t uses shared + t.
The server activates all (an empty task) to hold the whole global adapter.
Federated aggregation of the two kinds is :class:`strategies.mtlora.MTLoRA`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peft import LoraConfig, PeftModel

from fedlora.config import MAX_RANK, RunConfig, opt, task_names
from fedlora.keys import SHARED_ADAPTER, task_adapter
from fedlora.methods.base import task_type
from fedlora.methods.lora import LORA_OPTIONS, Lora


@dataclass(frozen=True)
class MtLoraSettings:
    """Multi-task LoRA (``adapter.method="mtlora"``): a shared LoRA plus a LoRA per task of ``data.tasks``."""

    section: ClassVar[str] = "mtlora"

    task_r: int = opt(4, "Rank of each task-specific LoRA.", check=lambda v, _: 1 <= v <= MAX_RANK)
    task_modules: str = opt(
        "o_proj,down_proj", "Modules that get task-specific LoRAs (in the last `task-layers` layers)."
    )
    task_layers: int = opt(
        2, "Task-specific LoRAs go on the last this-many layers: the decoder's stage end.", check=lambda v, _: v >= 1
    )


class MTLora(Lora):
    """Shared LoRA ("default") plus one LoRA per task of ``data.tasks``."""

    name = "mtlora"
    settings = MtLoraSettings
    uses = LORA_OPTIONS

    def check(self, cfg: RunConfig) -> dict[str, bool]:
        """``data.tasks`` must name the tasks."""
        return {"data.tasks": bool(task_names(cfg))}

    def add_adapters(self, model: PeftModel, cfg: RunConfig, task: str) -> None:
        """Add one task-specific LoRA per task on the last ``mtlora.task-layers`` layers, all active."""
        layers = model.base_model.model.config.num_hidden_layers
        for name in task_names(cfg):
            config = LoraConfig(
                task_type=task_type(task),
                r=cfg.mtlora.task_r,
                lora_alpha=cfg.adapter.alpha * cfg.mtlora.task_r / cfg.adapter.r,  # the shared LoRA's scaling
                lora_dropout=cfg.adapter.dropout,
                target_modules=[m.strip() for m in cfg.mtlora.task_modules.split(",") if m.strip()],
                layers_to_transform=list(range(max(0, layers - cfg.mtlora.task_layers), layers)),
            )
            model.add_adapter(task_adapter(name), config)
        self.activate(model, "")

    def task_adapters(self, task: str) -> list[str]:
        """The shared LoRA and ``task``'s LoRA: the two a task's model is made of."""
        return [SHARED_ADAPTER, task_adapter(task)]

    def activate(self, model: PeftModel, task: str) -> None:
        """Make the shared LoRA and ``task``'s LoRA the active, trainable ones ("": every task's)."""
        names = [n for n in model.peft_config if n != SHARED_ADAPTER and (not task or n == task_adapter(task))]
        if task and not names:
            raise ValueError(f"unknown task '{task}'; this model has tasks {sorted(model.peft_config)}")
        model.base_model.set_adapter([SHARED_ADAPTER, *names])
