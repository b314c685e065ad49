"""The separate-hosts harness (simulations/netns.py): addresses, reachability, a cut link, teardown."""

from __future__ import annotations

import sys
import time

import pytest

from simulations.netns import Network, unavailable

REASON = unavailable()
pytestmark = [pytest.mark.multihost, pytest.mark.skipif(REASON is not None, reason=f"no separate hosts here: {REASON}")]

SERVE = (
    "import socket\ns = socket.socket()\ns.bind(('0.0.0.0', 5000))\ns.listen()\nwhile True:\n    s.accept()[0].close()"
)


def reach_within(network: Network, connect: list[str], failure: str, seconds: float = 30) -> None:
    """Run ``connect`` on host b until it succeeds (one 1 s try can time out on a busy machine), for ``seconds``."""
    deadline = time.monotonic() + seconds
    while network.run("b", connect).returncode != 0:
        assert time.monotonic() < deadline, failure
        time.sleep(0.2)


def test_hosts_reach_each_other_until_cut_and_everything_goes_on_exit() -> None:
    with Network(["a", "b"]) as network:
        assert network.addresses == {"a": "10.77.0.10", "b": "10.77.0.11"}
        server = network.popen("a", [sys.executable, "-c", SERVE])
        connect = [
            sys.executable,
            "-c",
            f"import socket; socket.create_connection(('{network.addresses['a']}', 5000), 1)",
        ]
        reach_within(network, connect, "host b never reached host a")  # until the server listens
        local = [sys.executable, "-c", "import socket; socket.create_connection(('127.0.0.1', 5000), 1)"]
        assert network.run("b", local).returncode != 0  # b has its own ports: a's server is not on b
        network.cut("b")
        assert network.run("b", connect).returncode != 0  # the packets are lost: a timeout
        network.restore("b")
        reach_within(network, connect, "host b did not reach host a again once the link was restored")
        assert server.pid in network.pids()
    assert network.exists() == []
    assert server.poll() is not None
