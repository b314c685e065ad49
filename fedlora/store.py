"""Per-client state that must outlive one message: one safetensors file per client, on disk.

In simulation one worker serves many virtual clients in turn, and in deployment
each message starts a fresh ClientApp process; neither may keep a client's
tensors (optimizer moments, personal adapter parts) in memory between its
turns, or memory grows with the number of clients. A :class:`ClientStore` keeps
them in ``<root>/<namespace>/<client key>.safetensors`` instead:

* ``save`` writes a temporary file beside the target and ``os.replace``-s it
  in, so a crash (or a worker killed mid-write) leaves the old file or the new
  one, never half of one, and a worker restart finds the last complete state;
* ``load`` opens the file memory-mapped (``safetensors.safe_open``) and
  materialises only that client's tensors, only while they are used;
* nothing is cached in the process: the memory cost is one client's state at a
  time, whatever the number of clients.

Client keys come from :func:`client_key` (simulation: the ``partition-id``;
deployment: the node's ``data-path``, with its ``partition-id``), so a client
finds its own state again whichever worker or process serves it.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def client_key(node_config: Mapping[str, object]) -> str:
    """A stable identity for the client behind ``node_config``, usable as a file name.

    Simulation gives each virtual client a ``partition-id`` (unique within the
    federation); a deployed node is identified by its ``data-path`` (the data it
    trains on; with the ``partition-id`` it may also carry), because Flower's
    node id changes when a SuperNode restarts.
    """
    if "data-path" in node_config:
        digest = hashlib.sha256(str(node_config["data-path"]).encode()).hexdigest()[:16]
        return f"data-{digest}-{node_config.get('partition-id', 0)}"
    if "partition-id" in node_config:
        return f"partition-{int(node_config['partition-id'])}"  # type: ignore[arg-type]
    raise ValueError("node config has neither 'partition-id' nor 'data-path': no identity to store state under")


class ClientStore:
    """Tensors per client under ``root/namespace``, written atomically, read memory-mapped.

    ``namespace`` separates kinds of state (``optimizer``, ``personal``) so that
    features sharing a store never overwrite each other's files.
    """

    def __init__(self, root: str | Path, namespace: str = "state") -> None:
        self.directory = Path(root) / _filename(namespace)

    def path(self, key: str) -> Path:
        """The file holding ``key``'s tensors (it may not exist yet)."""
        return self.directory / f"{_filename(key)}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def save(self, key: str, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> None:
        """Replace ``key``'s tensors (and string ``metadata``) with these, atomically."""
        self.directory.mkdir(parents=True, exist_ok=True)
        # safetensors refuses views sharing storage; detached contiguous CPU copies are always accepted.
        plain = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
        target = self.path(key)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=self.directory)
        os.close(fd)
        try:
            save_file(plain, tmp, metadata=dict(metadata or {}))
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load(self, key: str) -> dict[str, Tensor] | None:
        """``key``'s tensors, or None when nothing was saved for it."""
        found = self.load_with_metadata(key)
        return None if found is None else found[0]

    def load_with_metadata(self, key: str) -> tuple[dict[str, Tensor], dict[str, str]] | None:
        """``key``'s tensors and metadata, or None when nothing was saved for it."""
        path = self.path(key)
        try:
            with safe_open(path, framework="pt") as f:  # memory-mapped: reads only what is asked for
                return {name: f.get_tensor(name) for name in f.keys()}, dict(f.metadata() or {})
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        """Forget ``key``'s state (no error when there is none)."""
        self.path(key).unlink(missing_ok=True)

    def keys(self) -> list[str]:
        """File stems of every stored client (the sanitised keys)."""
        if not self.directory.is_dir():
            return []
        return sorted(p.name.removesuffix(".safetensors") for p in self.directory.glob("*.safetensors"))


def _filename(key: str) -> str:
    """``key`` as a safe file name: other characters are hex-escaped, so distinct keys stay distinct."""
    if not key:
        raise ValueError("empty client-store key")
    return _SAFE.sub(lambda m: "%" + m.group().encode().hex(), key)


def optimizer_tensors(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, Tensor]:
    """The optimizer's per-parameter state as flat tensors ``<parameter name>/<field>``.

    Keyed by parameter name rather than by the optimizer's positional index, so
    the state maps back onto the right tensors even if parameter groups are
    built in another order (LoRA+ puts A and B in different groups).
    """
    names = {id(p): name for name, p in model.named_parameters()}
    flat = {}
    for param, state in optimizer.state.items():
        for field, value in state.items():
            if isinstance(value, Tensor):
                flat[f"{names[id(param)]}/{field}"] = value
            elif isinstance(value, int | float):
                flat[f"{names[id(param)]}/{field}"] = torch.tensor(value, dtype=torch.float64)
    return flat


def restore_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module, flat: Mapping[str, Tensor]) -> int:
    """Put state saved by :func:`optimizer_tensors` back into ``optimizer``; returns the parameters restored.

    A parameter whose saved moments do not match its shape is skipped (it starts
    afresh), so a changed adapter never crashes training on an old store.
    """
    by_param: dict[str, dict[str, Tensor]] = {}
    for key, value in flat.items():
        name, _, field = key.rpartition("/")
        by_param.setdefault(name, {})[field] = value
    params = dict(model.named_parameters())
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    restored = 0
    for name, fields in by_param.items():
        param = params.get(name)
        if param is None or id(param) not in in_optimizer:
            continue
        if any(t.dim() > 0 and t.shape != param.shape for t in fields.values()):
            continue
        # Moments live beside their parameter; scalar counters (AdamW's step) stay on the CPU, as torch keeps them.
        optimizer.state[param] = {field: t.to(param.device) if t.dim() > 0 else t for field, t in fields.items()}
        restored += 1
    return restored
