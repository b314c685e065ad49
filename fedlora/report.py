"""What a run leaves behind: ``metrics.json`` (rewritten atomically every round) and the adapter folder."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.common.logger import log
from peft import PeftModel

from fedlora.adapter import save_adapter_files
from fedlora.keys import NUM_EXAMPLES
from fedlora.methods.base import AdapterMethod


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    fsync(tmp)
    os.replace(tmp, path)  # a crash leaves the old file or the new one, never half of one
    fsync(path.parent)


def fsync(path: Path) -> None:
    """Flush a file's or a folder's contents to disk, so a rename after it never exposes unwritten data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RoundReport:
    """Per-round metrics, flushed to ``metrics.json`` after each round, with progress logging."""

    def __init__(self, path: Path, num_rounds: int, rounds: list[dict[str, Any]] | None = None) -> None:
        self.path = path
        self.num_rounds = num_rounds
        self.rounds: list[dict[str, Any]] = list(rounds or [])  # earlier rounds of a resumed run
        self._first_round = self.rounds[-1]["round"] if self.rounds else 0  # where this process started
        self._started = self._last = time.monotonic()

    def add(self, server_round: int, entry: dict[str, Any]) -> None:
        """Record round ``server_round`` (0 is the initial evaluation), write the file, log progress."""
        now = time.monotonic()
        entry = {"round": server_round, "round-time-s": round(now - self._last, 3), **entry}
        self._last = now
        self.rounds.append(entry)
        _atomic_write(self.path, json.dumps({"rounds": self.rounds}, indent=2) + "\n")
        log(INFO, "%s", self._progress(server_round, entry, now))

    def _progress(self, server_round: int, entry: dict[str, Any], now: float) -> str:
        central = entry.get("server-eval", {})
        parts = [f"round {server_round}/{self.num_rounds}"]
        done_here = server_round - self._first_round
        if done_here > 0:
            eta = (now - self._started) / done_here * (self.num_rounds - server_round)
            parts.append(f"{entry['round-time-s']:.1f}s (ETA {eta:.0f}s)")
        if "train-sampled" in entry.get("clients", {}):
            parts.append(f"clients {entry['clients']['train-replies']}/{entry['clients']['train-sampled']}")
        if "train-loss" in entry.get("train", {}):
            parts.append(f"train-loss {entry['train']['train-loss']:.4f}")
        parts += [f"{k} {v:.4f}" for k, v in central.items() if k != NUM_EXAMPLES]
        if "bytes-up" in entry:
            parts.append(f"up {entry['bytes-up'] / 1e6:.2f} MB, down {entry['bytes-down'] / 1e6:.2f} MB")
        return " | ".join(parts)


def write_folder(folder: Path, write: Callable[[Path], None], keep_old: bool = False) -> None:
    """Let ``write`` fill a scratch folder, then swap it in for ``folder``: a crash leaves a complete folder.

    The scratch folder's files and the folder itself are fsynced before the
    rename, and the parent after it, so a power loss cannot leave a renamed
    folder of empty files. Only in the instant between the two renames is there
    no ``folder``; then ``folder.old`` holds it. With ``keep_old`` the replaced
    folder stays as ``folder.old`` (a checkpoint's fallback).
    """
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    write(partial)
    for file in partial.rglob("*"):
        fsync(file)
    fsync(partial)
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    partial.rename(folder)
    fsync(folder.parent)
    if not keep_old:
        shutil.rmtree(old, ignore_errors=True)


def save_adapter(
    model: PeftModel, folder: Path, adapters: list[str] | None = None, method: AdapterMethod | None = None
) -> None:
    """Write the adapter folder (:func:`fedlora.adapter.save_adapter_files`), replacing an old one once complete.

    ``method`` adds what peft's format cannot hold (:meth:`AdapterMethod.save_extra`, e.g. LoRAMoE's routers).
    """

    def write(path: Path) -> None:
        save_adapter_files(model, path, adapters)
        if method is not None:
            method.save_extra(model, path)

    write_folder(folder, write)
