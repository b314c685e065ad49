"""A Flower deployment across separate hosts: every role in its own network namespace (simulations/netns.py).

``python -m simulations.deploy_multihost --nodes 3 -c "num-server-rounds=2 model.name='minilm'"``

The recipe of docs/deployment.md, as :class:`~simulations.deploy_local.LocalDeployment`
runs it, but the SuperLink, each SuperNode and the operator's ``flwr`` CLI run on
hosts of their own, reaching each other only over a private network: the
SuperLink listens on its host's address (``10.77.0.10:9092``) with a TLS
certificate for that address, the SuperNodes and the CLI connect to it from
theirs. Needs root (or CAP_NET_ADMIN) and iproute2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from simulations.deploy_local import LocalDeployment, deploy_and_run
from simulations.netns import Network
from simulations.run import ROOT

PORT = 9092  # each host has ports of its own: the documented port, whatever else runs on this machine


def hosts(nodes: int) -> list[str]:
    """The hosts of a deployment with ``nodes`` SuperNodes: the SuperLink, ``node-0``..., the operator."""
    return ["superlink", *(f"node-{i}" for i in range(nodes)), "operator"]


class MultiHostDeployment(LocalDeployment):
    """A :class:`LocalDeployment` whose SuperLink, SuperNodes (host = key name) and CLI run on ``network``'s hosts."""

    def __init__(self, work: Path, network: Network) -> None:
        super().__init__(work, network.addresses["superlink"], PORT)
        self.network = network

    def where(self, host: str, argv: list[str]) -> list[str]:
        """``argv`` run inside ``host``'s network namespace."""
        return self.network.command(host, argv)


def main() -> None:
    """Make the hosts, deploy, run once, stop everything and delete the hosts."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "deployment-multihost")
    parser.add_argument("-c", "--run-config", default="")
    args = parser.parse_args()
    with Network(hosts(args.nodes)) as network:
        code = deploy_and_run(MultiHostDeployment(args.work, network), args.nodes, args.run_config)
    sys.exit(code)


if __name__ == "__main__":
    main()
