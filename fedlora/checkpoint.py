"""Round checkpoints: what the server needs to continue a run after a crash.

After every round the server replaces ``<output-dir>/checkpoint/`` atomically
(:func:`fedlora.report.write_folder`) with the global adapter exactly as it was
sent (``adapter.safetensors``, in the wire dtype) and ``state.json``: the round,
the strategy's per-round log, the metrics so far and the state of Python's
``random`` (which Flower's node sampling uses). With ``resume = true`` the next
run continues from the round after it. Clients derive their shuffling and
dropout from (seed, round, partition), so a resumed run repeats exactly what an
uninterrupted one would have done.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord
from safetensors.numpy import load_file, save_file

from fedlora.report import write_folder


@dataclass
class Checkpoint:
    """The server's state after round ``server_round``."""

    server_round: int
    arrays: ArrayRecord
    round_log: dict[int, dict[str, Any]]
    metrics: list[dict[str, Any]]
    rng: Any  # random.getstate()


def save_checkpoint(folder: Path, checkpoint: Checkpoint) -> None:
    """Replace ``folder`` with ``checkpoint`` (never half-written)."""
    state = {
        "round": checkpoint.server_round,
        "round-log": {str(k): v for k, v in checkpoint.round_log.items()},
        "metrics": checkpoint.metrics,
        "python-random": list(checkpoint.rng),
    }

    def write(tmp: Path) -> None:
        save_file({k: v.numpy() for k, v in checkpoint.arrays.items()}, str(tmp / "adapter.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state) + "\n", encoding="utf-8")

    write_folder(folder, write)


def load_checkpoint(folder: Path) -> Checkpoint | None:
    """The checkpoint in ``folder`` (or in ``folder.old`` after a crash mid-swap); ``None`` if there is none."""
    for candidate in (folder, folder.with_name(folder.name + ".old")):
        if (candidate / "state.json").is_file():
            break
    else:
        return None
    state = json.loads((candidate / "state.json").read_text(encoding="utf-8"))
    arrays = load_file(str(candidate / "adapter.safetensors"))
    version, internal, gauss = state["python-random"]
    return Checkpoint(
        server_round=state["round"],
        arrays=ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        round_log={int(k): v for k, v in state["round-log"].items()},
        metrics=state["metrics"],
        rng=(version, tuple(internal), gauss),
    )


def restore_rng(checkpoint: Checkpoint) -> None:
    """Put Python's ``random`` back where it was when the checkpoint was written."""
    random.setstate(checkpoint.rng)
