"""A fedlora simulation on an existing Ray cluster: a Ray head on one host, Ray workers on others.

``python -m simulations.ray_cluster --workers 1 --clients 4 -c "num-server-rounds=2 model.name='minilm'"``

Flower 1.41's simulation runtime (``flwr-simulation``) starts Ray with
``ray.init(runtime_env=..., **init_args)``, where ``init_args`` holds only what the
federation config's ``init-args-num-cpus``, ``init-args-num-gpus``,
``init-args-logging-level`` and ``init-args-log-to-driver`` set; there is no
``address`` key. Without an address, ``ray.init`` connects to the cluster named by
the ``RAY_ADDRESS`` environment variable, so that is how a run uses an existing
cluster: start the cluster with ``ray start``, then run ``flwr run`` on the head's
host with ``RAY_ADDRESS=<head>:6379``, and leave ``init-args-num-cpus`` /
``init-args-num-gpus`` unset (Ray refuses them when it connects to a cluster).
The virtual clients' actors then spread over every node's CPUs
(``client-resources-num-cpus`` each).

Here the hosts are network namespaces (simulations/netns.py); each Ray node
keeps its files under a ``--temp-dir`` of its own, as it would on its own disk,
and runs in the foreground (``--block``) so it is stopped by PID. The head is
started first and each worker once the node before it says it has started.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from simulations.netns import Network
from simulations.run import ROOT, flwr_command, local_superlink, process_tree, stop_processes

RAY_PORT = 6379  # Ray's default GCS port, on the head's own address


def ray_start(head_address: str, address: str, temp_dir: Path, num_cpus: int, head: bool) -> list[str]:
    """``ray start`` for a node on ``address`` (the head, or a worker joining the head), in the foreground."""
    role = ["--head", f"--port={RAY_PORT}", "--include-dashboard=false"] if head else []
    return [
        str(Path(sys.executable).parent / "ray"),
        "start",
        *role,
        *([] if head else [f"--address={head_address}:{RAY_PORT}"]),
        f"--node-ip-address={address}",
        f"--temp-dir={temp_dir}",
        f"--num-cpus={num_cpus}",
        "--disable-usage-stats",
        "--block",
    ]


@dataclass
class RayCluster:
    """A running cluster: the head's ``address:port`` and each host's Ray folder (its session logs are there)."""

    address: str
    temp_dirs: dict[str, Path]


@contextmanager
def ray_cluster(network: Network, head: str, workers: list[str], work: Path, num_cpus: int = 1) -> Iterator[RayCluster]:
    """A Ray head on host ``head`` and a worker on each of ``workers``.

    Each node logs to ``work/<host>.log`` and keeps its session in a folder of its own
    (``temp_dirs``; short paths under /tmp, since Ray's socket paths must fit in
    107 bytes), removed on exit like the nodes themselves, which are stopped by PID.
    """
    work.mkdir(parents=True, exist_ok=True)
    head_ip = network.addresses[head]
    temp_dirs = {host: Path(tempfile.mkdtemp(prefix=f"ray-{host}-")) for host in [head, *workers]}
    started = []
    try:
        for host in [head, *workers]:
            with open(work / f"{host}.log", "w") as log:
                argv = ray_start(head_ip, network.addresses[host], temp_dirs[host], num_cpus, host == head)
                started.append(network.popen(host, argv, stdout=log, stderr=subprocess.STDOUT))
            deadline = time.monotonic() + 300
            while "Ray runtime started" not in (work / f"{host}.log").read_text():  # it has joined (or is the head)
                if time.monotonic() > deadline or started[-1].poll() is not None:
                    raise RuntimeError(f"Ray on {host} did not start; see {work / host}.log")
                time.sleep(0.5)
        yield RayCluster(f"{head_ip}:{RAY_PORT}", temp_dirs)
    finally:
        stop_processes(process_tree([p.pid for p in started]), timeout=10)
        for folder in temp_dirs.values():
            shutil.rmtree(folder, ignore_errors=True)


def simulate_on_cluster(
    network: Network,
    host: str,
    address: str,
    run_config: str,
    clients: int,
    flwr_home: Path,
    federation_config: str = "client-resources-num-cpus=1",
    timeout: float = 900,
) -> subprocess.CompletedProcess[str]:
    """``flwr run . --stream`` on ``host`` with ``RAY_ADDRESS=address``: the simulation joins that cluster."""
    with local_superlink(flwr_home) as env:
        return subprocess.run(
            network.command(host, flwr_command(run_config, clients, federation_config)),
            env={**env, "RAY_ADDRESS": address},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def main() -> None:
    """Make a head host and worker hosts, start Ray on them, run one simulation on that cluster, tear down."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=1, help="Ray worker hosts besides the head")
    parser.add_argument("--clients", type=int, default=4, help="virtual clients (num-supernodes)")
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "ray-cluster")
    parser.add_argument("-c", "--run-config", default="")
    args = parser.parse_args()
    workers = [f"worker-{i}" for i in range(args.workers)]
    with Network(["head", *workers]) as network, ray_cluster(network, "head", workers, args.work) as cluster:
        result = simulate_on_cluster(
            network, "head", cluster.address, args.run_config, args.clients, args.work / "flwr"
        )
    print(result.stdout[-4000:], result.stderr[-2000:])
    sys.exit(result.returncode)


if __name__ == "__main__":
    main()
