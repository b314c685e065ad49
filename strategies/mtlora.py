"""MTLoRA across clients: the task-agnostic LoRA averaged over every client, each task's LoRA within its task.

Agiza et al., "MTLoRA: Low-Rank Adaptation Approach for Efficient Multi-Task
Learning", CVPR 2024, https://arxiv.org/abs/2403.20320, federated: clients do
different tasks (``adapter.method = "mtlora"``, :mod:`fedlora.methods.mtlora`).
Shared tensors (peft adapter "default") are aggregated over all clients; the
tensors of task t (adapter "task-t") only over the clients of task t, which
alone receive them: a client never sees another task's adapter. A node whose
task is not one of ``data.tasks`` is left out with the reason logged.
"""

from __future__ import annotations

from typing import Any

from fedlora.config import RunConfig, task_names
from fedlora.keys import task_of
from fedlora.validation import InvalidUpdate
from strategies.base import NodeProfile
from strategies.split import SplitStrategy


class MTLoRA(SplitStrategy):
    """Shared LoRA over all clients, task-specific LoRA per task."""

    def __init__(self, *, tasks: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tasks = tasks

    @classmethod
    def options(cls, cfg: RunConfig) -> dict[str, Any]:
        """``strategy.within`` and the run's tasks."""
        return {**super().options(cfg), "tasks": tuple(task_names(cfg))}

    @classmethod
    def noise_refusal(cls, cfg: RunConfig) -> str:
        """Refused: each task's sum has its own clients, and the noise is calibrated for one sum over all."""
        return (
            "each task's tensors are summed over that task's clients only, and the Gaussian noise is calibrated "
            "for one sum over every client (per-task noise is not implemented)"
        )

    def scope(self, key: str) -> str:
        """The task of a task-specific tensor; ``GLOBAL`` for a shared one."""
        return task_of(key) or self.GLOBAL

    def check_profile(self, profile: NodeProfile) -> None:
        """The node's task must be one of the run's tasks."""
        super().check_profile(profile)
        if profile.task not in self.tasks:
            raise InvalidUpdate(f"unknown task '{profile.task}'; this run's tasks are {', '.join(self.tasks)}")
