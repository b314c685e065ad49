"""The names things travel under: the grammar of adapter tensor keys and the keys of the message protocol.

Every party must read a key the same way, so both live here and every other module imports them; none retypes
them.

**Tensor keys** are the model's parameter names (``model.named_parameters()``), for a LoRA factor
``<module>.lora_A.<adapter>.weight``, for example
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``. How a tensor aggregates follows from
its key alone (strategies need no per-method code): ``lora_A``/``lora_B`` of one module and adapter are one
low-rank update ``B·A`` (:func:`lora_pairs`), unless AdaLoRA's singular values ``lora_E`` sit between them; DoRA's
magnitude and every other tensor are averaged element-wise. MTLoRA's task-specific adapters are named
``task-<task>`` (:func:`task_adapter`), so a key names its task. LoRAMoE's experts are the peft adapters ``default``,
``expert-1``, … (:func:`expert_adapter`), each an ordinary factor pair, and its router per layer is
``<module>.moe_router.weight``. A global adapter may also carry, per LoRA layer,
a residual ``<module>.residual_B``/``<module>.residual_A`` that the parties merge into their base weights (FLoRA).
A full-parameter method (LISA) sends base parameters under their own names; one that is frozen this round but
differs from the initial base travels as ``<name>@frozen`` (:func:`frozen_key`): the party writes it into its
base and does not train it. Decoder layer ``i``'s parameters contain ``.layers.<i>.`` (``.layer.``, ``.h.``,
``.blocks.`` in other architectures; :func:`layer_of`).

**Protocol keys** name the records of a Flower message and the entries the server and clients exchange; they
are Flower ``FedAvg``'s defaults where Flower has one, passed to it explicitly so the two cannot drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TypeVar

T = TypeVar("T")

# --- Tensor keys ---------------------------------------------------------------------------------------------------

LORA_A, LORA_B, LORA_E = ".lora_A.", ".lora_B.", ".lora_E."
"""LoRA factor markers: ``B·A`` (d×r · r×k), AdaLoRA's ``B·diag(E)·A``."""

DORA_MAGNITUDE = ".lora_magnitude_vector."
"""DoRA's per-output magnitude vector of a module."""

HEAD_COPY = ".modules_to_save."
"""The trained copy of a module peft trains whole (``modules_to_save``: a classification head)."""

RESIDUAL_A, RESIDUAL_B = ".residual_A", ".residual_B"
"""Suffixes of a module's residual factors: an aggregated update merged into the base, never trained nor sent back."""

BOTTLENECK_PREFIX = "bottleneck_"
BOTTLENECK_DOWN, BOTTLENECK_UP = BOTTLENECK_PREFIX + "down", BOTTLENECK_PREFIX + "up"
"""A bottleneck adapter's down- and up-projection (``<module>.bottleneck_down.<adapter>.weight``/``.bias``):
averaged element-wise, as no product of them is the update (a non-linearity sits between)."""

SHARED_ADAPTER = "default"
"""peft's name of a model's first adapter: the only one, or MTLoRA's task-agnostic one."""

BASE_ONLY = "__base__"
"""peft's adapter name for a row of a mixed batch that goes through the base alone (``adapter_names``)."""

TASK_PREFIX = "task-"
"""MTLoRA's task-specific adapters are ``task-<task>``."""

ROUTER_MODULE = "moe_router"
"""The attribute of a LoRA layer holding LoRAMoE's router (gating network), keyed ``<module>.moe_router.weight``."""

ROUTER = f".{ROUTER_MODULE}."
"""The marker of a LoRAMoE router tensor."""

EXPERT_PREFIX = "expert-"
"""LoRAMoE's experts after the first (peft's ``default``) are the peft adapters ``expert-<i>``."""

FROZEN = "@frozen"
"""Suffix of a base parameter a party writes into its base without training it (a layer LISA trained earlier)."""

LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")
"""Where a parameter name holds its decoder layer's index (``model.layers.3.mlp…``, ``encoder.layer.3.…``)."""

PEFT_PREFIX = "base_model.model."
"""What a ``PeftModel`` puts before the inner model's parameter names (peft reports some names without it)."""


def is_lora_a(key: str) -> bool:
    """Whether ``key`` is a LoRA ``A`` factor (r×k)."""
    return LORA_A in key


def is_lora_b(key: str) -> bool:
    """Whether ``key`` is a LoRA ``B`` factor (d×r)."""
    return LORA_B in key


def is_lora_e(key: str) -> bool:
    """Whether ``key`` is an AdaLoRA singular-value vector ``E``."""
    return LORA_E in key


def is_residual(key: str) -> bool:
    """Whether ``key`` is a residual factor (FLoRA), which a party merges into its base instead of training it."""
    return key.endswith((RESIDUAL_A, RESIDUAL_B))


def is_frozen(key: str) -> bool:
    """Whether ``key`` names a base parameter sent to be written into the base, not trained (:data:`FROZEN`)."""
    return key.endswith(FROZEN)


def is_base_tensor(key: str) -> bool:
    """Whether a message's tensor ``key`` is written into the receiving party's base instead of trained.

    A residual factor (FLoRA, Delta-LoRA) or a ``@frozen`` base parameter (LISA):
    the strategy's own, never trained and never sent back. Everything else a
    message holds is what the receiver trains (:func:`trained_part`).
    """
    return is_residual(key) or is_frozen(key)


def trained_part(state: Mapping[str, T]) -> dict[str, T]:
    """The tensors of a message that the receiver trains and sends back: all but its base tensors."""
    return {key: value for key, value in state.items() if not is_base_tensor(key)}


def base_part(state: Mapping[str, T]) -> dict[str, T]:
    """The tensors of a message that the receiver writes into its base (:func:`is_base_tensor`)."""
    return {key: value for key, value in state.items() if is_base_tensor(key)}


def frozen_key(name: str) -> str:
    """The key parameter ``name`` travels under when it is frozen this round."""
    return name + FROZEN


def layer_of(key: str) -> int | None:
    """The decoder layer a parameter (or its frozen key) belongs to; None outside the layers (embeddings, head)."""
    found = LAYER_INDEX.search(key)
    return int(found.group(1)) if found else None


def module_of(key: str) -> str:
    """The module a LoRA factor belongs to: ``….q_proj.lora_A.default.weight`` → ``….q_proj``."""
    for marker in (LORA_A, LORA_B, LORA_E):
        module, found, _ = key.partition(marker)
        if found:
            return module
    raise ValueError(f"'{key}' is not a LoRA factor")


def param_key(module: str, marker: str, adapter: str, param: str = "weight") -> str:
    """The name of ``module``'s parameter ``param`` in its ``marker`` part (:data:`LORA_A`, …) for peft ``adapter``."""
    return f"{module}{marker}{adapter}.{param}"


def lora_pairs(keys: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Map each LoRA layer whose two factors are both present to its ``(A key, B key)``.

    ``….q_proj.lora_A.default.weight`` pairs with ``….q_proj.lora_B.default.weight``
    under the layer ``….q_proj.default``. A lone factor (LoRA-FA sends only B)
    is not a pair: it is averaged like any other tensor, which for a shared,
    frozen A is the exact average of the products. Nor is an AdaLoRA triplet
    (``lora_E`` between the factors: the update is B·diag(E)·A).
    """
    keys = set(keys)
    pairs = {}
    for a_key in sorted(k for k in keys if is_lora_a(k)):
        b_key = a_key.replace(LORA_A, LORA_B)
        if b_key in keys and a_key.replace(LORA_A, LORA_E) not in keys:
            module, suffix = a_key.split(LORA_A, 1)
            adapter = suffix.removesuffix("weight").rstrip(".")
            pairs[f"{module}.{adapter}" if adapter else module] = (a_key, b_key)
    return pairs


def task_adapter(task: str) -> str:
    """The peft adapter name of ``task``'s task-specific LoRA (MTLoRA)."""
    return f"{TASK_PREFIX}{task}"


def expert_adapter(index: int) -> str:
    """The peft adapter name of LoRAMoE expert ``index`` (expert 0 is the model's first adapter, ``default``)."""
    return SHARED_ADAPTER if index == 0 else f"{EXPERT_PREFIX}{index}"


def is_router(key: str) -> bool:
    """Whether ``key`` is a LoRAMoE router weight (averaged element-wise, like any lone tensor)."""
    return ROUTER in key


def task_of(key: str) -> str:
    """The task whose task-specific LoRA tensor ``key`` is, or "" for a shared tensor."""
    marker = next((part for part in key.split(".") if part.startswith(TASK_PREFIX)), "")
    return marker.removeprefix(TASK_PREFIX)


def task_state(state: Mapping[str, T], task: str) -> dict[str, T]:
    """The shared tensors of ``state`` and those of ``task``: what a model activated for ``task`` holds."""
    return {k: v for k, v in state.items() if task_of(k) in ("", task)}


# --- Protocol keys -------------------------------------------------------------------------------------------------

ARRAYS, METRICS, CONFIG = "arrays", "metrics", "config"
"""Record names of a message: the adapter (``ArrayRecord``), a reply's metrics, an instruction's configuration."""

NUM_EXAMPLES = "num-examples"
"""A reply's metric holding its example count: the aggregation weight."""

SERVER_ROUND = "server-round"
"""The round number in an instruction's configuration (Flower's ``FedAvg`` sets it)."""

RANK_PATTERN = "rank-pattern"
"""ConfigRecord of an AdaLoRA reply: per ``lora_E`` key, which rank indices its client kept."""

TRAINABLE_LAYERS = "trainable-layers"
"""Config entry of a training instruction: the LoRA layers (module names) the client trains and sends back, when
the server trains only some of them (LoRA-drop); absent, every trainable tensor trains."""

LAYER_IMPORTANCE = "layer-importance"
"""Per-layer importance: in a training instruction's config, ``True`` asks the client to measure it after training;
in its reply, the ConfigRecord of the measurements, one non-negative float per LoRA layer (module name)."""

RANK_KEY, TASK_KEY = "lora-rank", "task"
"""A node's LoRA rank and task: its node-config keys and its answers to the server's profile query."""

PROFILE, PROFILE_QUESTION = "profile", "ask"
"""The profile query: the ConfigRecord of the client's answer, and the entry listing what the server asks."""

SECAGG = "secagg"
"""Secure aggregation (SecAgg+): the ConfigRecord of every stage's instruction and answer, and of a client's state."""

SECAGG_KEYS, SECAGG_SHARES, SECAGG_TRAIN, SECAGG_UNMASK = "secagg_keys", "secagg_shares", "secagg", "secagg_unmask"
"""The stages' actions: ``query.secagg_keys``, ``query.secagg_shares``, ``train.secagg``, ``query.secagg_unmask``."""

MASKED = "masked"
"""The array of a secure training reply's ArrayRecord: the masked, quantised, weighted update (``uint64``)."""

SA_INDEX, SA_THRESHOLD, SA_PEERS, SA_CLIENTS = "index", "threshold", "peers", "clients"
"""Stage entries: the client's index in the round, the shares needed, its neighbours, the clients in the sum."""

SA_ENCRYPTION_KEY, SA_MASK_KEY, SA_SHARES, SA_COMMITMENT = "encryption-key", "mask-key", "shares", "commitment"
"""Stage entries: the public keys (one per neighbour in an instruction), encrypted or plain shares, b's hash."""

SA_REJECTED, SA_REASONS, SA_ALIVE, SA_DROPPED, SA_STATE = "rejected", "reasons", "alive", "dropped", "state"
"""Stage entries: neighbours whose share was bad and why; whose seeds / keys to reveal; the client's kept secrets."""

SA_SIZES, SA_GROUPS = "sizes", "groups"
"""Stage-3 entries: the length of each group's segment of a masked input, and the group of each tensor a client sends
(a strategy whose groups have their own clients, MTLoRA's tasks, gets one secure sum per group)."""

CENTRAL = "central"
"""Config entry of an ``evaluate`` message that asks a worker for the central evaluation (``eval.central = worker``)."""


def task_metrics(task: str) -> str:
    """The MetricRecord holding ``task``'s central evaluation in a worker's reply (:data:`METRICS` without tasks)."""
    return f"{METRICS}-{task}" if task else METRICS
