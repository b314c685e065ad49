"""Run fedlora's ServerApp and ClientApp in this process: the same code and messages, no SuperLink, no Ray.

``python -m simulations.inprocess --clients 3 -c "num-server-rounds=2 model.name='minilm'"``

``flwr run`` spends 10-20 s starting a SuperLink, Ray and a worker process per
node before the first round, which dominates short runs: tests that federate a
tiny model for two rounds, learning curves over many seeds. This runner calls
the ServerApp's ``main`` with an :class:`InProcessGrid` that hands each message
to the ClientApp, after a round trip through Flower's protobuf serialisation
(so a client never shares a tensor with the server, and anything Flower cannot
serialise fails here too). A ClientApp exception becomes an error reply, as a
SuperNode sends one. Each node keeps its own ``Context`` (node config and
state) across rounds, as in a Flower simulation.

What it does not reproduce: separate processes (every node shares this
process's model cache, as nodes served by one Ray worker do; Python's, NumPy's
and torch's global random states are swapped so that the clients' draws do not
move the server's), message TTLs, timeouts and SuperLink restarts. Use
``flwr run`` (:mod:`simulations.run`) for those and for anything timed.
"""

from __future__ import annotations

import argparse
import json
import random
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.config import parse_config_args
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedlora.config import default_run_config
from simulations.pool import run_jobs

RUN_ID = 1
FIRST_NODE_ID = 1001  # node ids of the virtual nodes: FIRST_NODE_ID + partition id


def _wire(message: Message) -> Message:
    """``message`` as the receiving side gets it: serialised and parsed again, sharing nothing with the sender."""
    received = message_from_proto(message_to_proto(message))
    received.metadata.__dict__["_message_id"] = message.metadata.message_id  # the proto leaves the id out
    return received


class _RandomState:
    """Python's, NumPy's and torch's global random states, to give a process its own between calls."""

    def __init__(self) -> None:
        self.state = (random.getstate(), np.random.get_state(), torch.get_rng_state())

    @contextmanager
    def active(self) -> Iterator[None]:
        """Run the block on these random states, then keep where it left them and restore the caller's."""
        caller = _RandomState()
        random.setstate(self.state[0])
        np.random.set_state(self.state[1])
        torch.set_rng_state(self.state[2])
        try:
            yield
        finally:
            self.state = _RandomState().state
            random.setstate(caller.state[0])
            np.random.set_state(caller.state[1])
            torch.set_rng_state(caller.state[2])


class InProcessGrid(Grid):
    """A Flower ``Grid`` whose nodes are ``client_app`` called in this process, one ``Context`` per node."""

    pull_interval = 0.0  # replies are ready as soon as push_messages returns

    def __init__(self, client_app: ClientApp, node_configs: list[dict[str, Any]], run_config: dict[str, Any]) -> None:
        self.client_app = client_app
        self.contexts = {
            FIRST_NODE_ID + i: Context(RUN_ID, FIRST_NODE_ID + i, node_config, RecordDict(), run_config)
            for i, node_config in enumerate(node_configs)
        }
        self.random = _RandomState()  # the clients' "process"
        self.replies: dict[str, Message] = {}
        self._run = Run.create_empty(RUN_ID)

    def set_run(self, run: Run) -> None:
        """Keep ``run`` (Flower's apps do not call it on a grid they are handed)."""
        self._run = run

    @property
    def run(self) -> Run:
        """The run these nodes belong to."""
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        """A message from the server (Flower deprecates this in favour of the ``Message`` constructor)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """Every node: all are connected from the start."""
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message to its node's ClientApp now; the reply waits for :meth:`pull_messages`."""
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.replies[message.metadata.message_id] = self._deliver(_wire(message))
            ids.append(message.metadata.message_id)
        return ids

    def _deliver(self, message: Message) -> Message:
        """Call the ClientApp as the destination node; an exception becomes an error reply."""
        node_id = message.metadata.dst_node_id
        if node_id not in self.contexts:
            return Message(Error(ErrorCode.UNKNOWN, f"no node {node_id}"), reply_to=message)
        TaskIdentity.node_id = node_id
        try:
            with self.random.active():
                reply = self.client_app(message, self.contexts[node_id])
        except Exception as error:  # a SuperNode reports any ClientApp exception as an error reply
            reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, repr(error)), reply_to=message)
        finally:
            TaskIdentity.node_id = SUPERLINK_NODE_ID
        return _wire(reply)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to ``message_ids`` that have not been pulled yet."""
        return [self.replies.pop(i) for i in message_ids if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Deliver ``messages`` and return every reply (``timeout`` is moot: delivery is synchronous)."""
        return self.pull_messages(self.push_messages(messages))


def run_in_process(
    overrides: Mapping[str, Any], nodes: int, node_configs: list[dict[str, Any]] | None = None
) -> list[dict]:
    """Run fedlora with run-config ``overrides`` on ``nodes`` in-process nodes; metrics.json's rounds.

    ``overrides`` must set ``output-dir``. Nodes get Flower simulation's node config
    (``partition-id``, ``num-partitions``) unless ``node_configs`` gives one per node.
    """
    from client_app.app import app as client_app  # the apps load models and data: import them only to run
    from server_app.app import main

    run_config = {**default_run_config(), **overrides}
    configs = node_configs or [{"partition-id": i, "num-partitions": nodes} for i in range(nodes)]
    grid = InProcessGrid(client_app, configs, run_config)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, SUPERLINK_NODE_ID, 0
    main(grid, Context(RUN_ID, SUPERLINK_NODE_ID, {}, RecordDict(), run_config))
    return json.loads((Path(str(run_config["output-dir"])) / "metrics.json").read_text())["rounds"]


def timed_run(job: tuple[Mapping[str, Any], int]) -> tuple[list[dict], float]:
    """``run_in_process(overrides, nodes)`` for ``job``, and its wall seconds (a :mod:`simulations.pool` job)."""
    started = time.monotonic()
    rounds = run_in_process(*job)
    return rounds, time.monotonic() - started


@dataclass
class Seeded:
    """What :func:`run_seeded` ran: every run's rounds and wall seconds by setting, and the wall time of it all."""

    runs: dict[str, dict[int, list[dict]]]  # setting -> seed -> metrics.json's rounds
    walls: dict[str, list[float]]  # setting -> wall seconds of each of its runs
    wall: float


def run_seeded(
    configs: Mapping[tuple[str, int], Mapping[str, Any]],
    nodes: int,
    workers: int,
    summary: Callable[[list[dict]], object],
) -> Seeded:
    """Run each ``(setting, seed)``'s run config on ``nodes`` in-process nodes, ``workers`` runs side by side.

    Prints ``summary(rounds)`` as each run ends, so a long comparison shows its progress.
    """
    seeded = Seeded({setting: {} for setting, _ in configs}, {setting: [] for setting, _ in configs}, 0.0)

    def done(key: tuple[str, int], result: tuple[list[dict], float]) -> None:
        (setting, seed), (rounds, wall) = key, result
        seeded.runs[setting][seed] = rounds
        seeded.walls[setting].append(wall)
        print(f"[{wall:.0f}s] {setting} seed {seed}: {summary(rounds)}", flush=True)

    started = time.monotonic()
    run_jobs({key: (config, nodes) for key, config in configs.items()}, timed_run, done, workers)
    seeded.wall = time.monotonic() - started
    return seeded


def main() -> None:
    """Command line: number of nodes and run-config overrides (TOML values, as ``flwr run --run-config``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4, help="nodes (Flower simulation's num-supernodes)")
    parser.add_argument("-c", "--run-config", default="", help='overrides, e.g. "num-server-rounds=2"')
    args = parser.parse_args()
    run_in_process(parse_config_args([args.run_config] if args.run_config else None), args.clients)


if __name__ == "__main__":
    main()
