"""Round checkpoints: what the server needs to continue a run after a crash, and only a run it fits.

After every round the server replaces ``<output-dir>/checkpoint/`` atomically
(:func:`fedlora.report.write_folder`, files and folder fsynced) with the global
adapter exactly as it was sent (``adapter.safetensors``: one tensor per key, in
the wire dtype, unpacked from the wire's packed record so the file stays
readable with any safetensors tool) and
``state.json``: the round, the strategy's per-round log, the metrics so far, the
state of Python's ``random`` (which Flower's node sampling uses), the run's
:func:`fingerprint`, the adapter's shapes and a SHA-256 digest of all of it. The
previous round's checkpoint stays in ``checkpoint.old``. With ``resume = true``
the next run continues from the round after it. Clients derive their shuffling
and dropout from (seed, round, partition), so a resumed run repeats exactly what
an uninterrupted one would have done, which is why it refuses a checkpoint
written with other settings (:func:`check_resumable`): one error naming the file
and what differs. A checkpoint that cannot be read or whose digest does not match
(a torn write, an edit by hand) falls back to ``checkpoint.old``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from flwr.common.logger import log
from safetensors.numpy import load_file, save_file
from torch import Tensor

from fedlora.config import RunConfig, default_run_config, method_values
from fedlora.keys import trained_part
from fedlora.report import write_folder
from fedlora.validation import InvalidUpdate, check_state
from fedlora.wire import WIRE_DTYPES, from_record, to_record, unpack

FINGERPRINT_SECTIONS = ("model", "data", "adapter", "strategy", "train", "wire")
"""The framework's run-config sections that decide the adapter's numbers; with ``seed`` and every method's own
section (:func:`fedlora.config.method_values`) they must not change on resume.

Left out, so a resumed run may change them: the number of rounds (to extend a
run), sampling fractions, output and store folders, ``resume`` itself, the reply
bounds (``min-replies``, ``max-update-norm``, ``max-weight-ratio``), the model
cache folder and the evaluation batch size.
"""


class CheckpointError(ValueError):
    """A checkpoint is unreadable or does not fit this run; the message names the file and the problem."""


@dataclass
class Checkpoint:
    """The server's state after round ``server_round``; ``path`` is the folder it was read from."""

    server_round: int
    arrays: ArrayRecord
    round_log: dict[int, dict[str, Any]]
    metrics: list[dict[str, Any]]
    rng: Any  # random.getstate()
    fingerprint: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def fingerprint(cfg: RunConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the one that wrote the checkpoint, as ``key: value``."""
    settings = {
        f"{section}.{name.replace('_', '-')}": value
        for section in FINGERPRINT_SECTIONS
        for name, value in dataclasses.asdict(getattr(cfg, section)).items()
    }
    settings.update(method_values(cfg))
    del settings["model.cache-dir"]  # where a converted model is cached, not which model
    return {"seed": cfg.run.seed, **settings}


def save_checkpoint(folder: Path, checkpoint: Checkpoint) -> None:
    """Replace ``folder`` with ``checkpoint`` (never half-written; the previous one is kept as ``folder.old``)."""
    tensors = unpack(checkpoint.arrays)
    state = {
        "round": checkpoint.server_round,
        "round-log": {str(k): v for k, v in checkpoint.round_log.items()},
        "metrics": checkpoint.metrics,
        "python-random": list(checkpoint.rng),
        "fingerprint": checkpoint.fingerprint,
        "shapes": {k: list(a.shape) for k, a in tensors.items()},
    }

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "adapter.safetensors"))
        digest = _digest((tmp / "adapter.safetensors").read_bytes(), state)
        (tmp / "state.json").write_text(json.dumps({**state, "sha256": digest}) + "\n", encoding="utf-8")

    write_folder(folder, write, keep_old=True)


def load_checkpoint(folder: Path) -> Checkpoint | None:
    """The checkpoint in ``folder``, else the previous one in ``folder.old``; ``None`` if neither exists.

    Raises :class:`CheckpointError` when checkpoints exist but none can be read.
    """
    candidates = [c for c in (folder, folder.with_name(folder.name + ".old")) if c.exists()]
    problems = []
    for candidate in candidates:
        try:
            return _read(candidate)
        except CheckpointError as err:
            log(WARNING, "resume: %s; trying the previous checkpoint", err)
            problems.append(str(err))
    if problems:
        raise CheckpointError("no usable checkpoint: " + "; ".join(problems))
    return None


def _read(folder: Path) -> Checkpoint:
    path = folder / "state.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        adapter = (folder / "adapter.safetensors").read_bytes()
        digest = state.pop("sha256")
        version, internal, gauss = state["python-random"]
        round_log = {int(k): v for k, v in state["round-log"].items()}
        server_round, metrics = state["round"], state["metrics"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path} cannot be read ({type(err).__name__}: {err})") from err
    if digest != _digest(adapter, state):
        raise CheckpointError(f"{path}: its SHA-256 does not match its contents (a torn write or an edit)")
    tensors = load_file(str(folder / "adapter.safetensors"))
    dtypes = {t.dtype.name for t in tensors.values()} or {"float32"}
    if len(dtypes) != 1 or not dtypes <= WIRE_DTYPES.keys():
        raise CheckpointError(f"{folder / 'adapter.safetensors'} holds {sorted(dtypes)}, not one wire dtype")
    return Checkpoint(
        server_round=server_round,
        arrays=to_record({k: torch.from_numpy(v) for k, v in tensors.items()}, dtypes.pop()),  # as it was sent
        round_log=round_log,
        metrics=metrics,
        rng=(version, tuple(internal), gauss),
        fingerprint=state.get("fingerprint", {}),
        path=folder,
    )


def _digest(adapter: bytes, state: Mapping[str, Any]) -> str:
    return hashlib.sha256(adapter + json.dumps(state, sort_keys=True).encode()).hexdigest()


def check_resumable(checkpoint: Checkpoint, cfg: RunConfig, initial: Mapping[str, Tensor]) -> None:
    """Raise :class:`CheckpointError` unless ``checkpoint`` continues this run.

    Its round must be in 0..``num-server-rounds`` (0: written after the
    initial evaluation) with one metrics entry per round so far, its
    fingerprint must equal this run's, and its adapter must have the shapes of
    ``initial``, the adapter this run's model starts with (a residual, which
    changes rank, excepted). A setting the checkpoint does not record (added to
    fedlora after it was written, e.g. a new method's) matches when this run
    leaves it at its default.
    """
    where = checkpoint.path / "state.json" if checkpoint.path else "checkpoint"
    rounds = cfg.run.num_server_rounds
    if not isinstance(checkpoint.server_round, int) or not 0 <= checkpoint.server_round <= rounds:
        raise CheckpointError(f"{where}: round {checkpoint.server_round!r} is outside 0..num-server-rounds={rounds}")
    logged = [m.get("round") if isinstance(m, dict) else m for m in checkpoint.metrics]
    if logged != list(range(checkpoint.server_round + 1)):
        raise CheckpointError(f"{where}: metrics cover rounds {logged}, expected 0..{checkpoint.server_round}")
    expected, defaults = fingerprint(cfg), default_run_config()
    changed = [
        f"{key}={checkpoint.fingerprint.get(key, '(absent)')!r} there, {expected.get(key, '(absent)')!r} here"
        for key in sorted(set(expected) | set(checkpoint.fingerprint))
        if checkpoint.fingerprint.get(key) != expected.get(key)
        and not (key not in checkpoint.fingerprint and expected.get(key) == defaults.get(key))
    ]
    if changed:
        raise CheckpointError(f"{where} was written by a run with other settings: {'; '.join(changed)}")
    try:
        check_state(trained_part(from_record(checkpoint.arrays)), trained_part(initial))
    except (InvalidUpdate, ValueError) as err:
        raise CheckpointError(f"{where}: its adapter does not fit this run's model: {err}") from err


def restore_rng(checkpoint: Checkpoint) -> None:
    """Put Python's ``random`` back where it was when the checkpoint was written."""
    random.setstate(checkpoint.rng)
