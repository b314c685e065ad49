"""Separate hosts on one Linux machine: network namespaces joined by a private bridge.

``with Network(["superlink", "node-0", "operator"]) as net: net.popen("node-0", [...])``

Each host is a network namespace of its own (its own interfaces, addresses, ports
and routing; the file system and the host name stay shared). The bridge lives in
one more namespace, the *fabric*, and every host is joined to it by a veth pair
whose outer end sits in the fabric too, so nothing is added to the machine's own
network: the hosts reach each other on ``10.77.0.0/24`` and nothing else, and
deleting the namespaces removes every interface. Names carry a per-network token
so several networks (pytest-xdist workers) coexist; since no network shares a
bridge with another, all can use the same addresses.

Cutting a host's link takes its veth end in the fabric down: the host sees its
carrier drop, packets to and from it are lost, TCP connections stall until the
link is restored (as with an unplugged cable or a failed switch port).
Everything is torn down by PID (the processes started here and whatever else
runs inside the namespaces, e.g. daemons ``ray start`` forks off) and by name.
Needs root (or CAP_NET_ADMIN) and iproute2's ``ip``: :func:`unavailable` says why not.
"""

from __future__ import annotations

import ipaddress
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from simulations.run import process_tree, stop_processes

SUBNET = ipaddress.ip_network("10.77.0.0/24")
FIRST_HOST = 10  # hosts get .10, .11, ...; nothing else is on the bridge
INTERFACE = "eth0"  # each host's end of its veth pair (names are per namespace)
IP = shutil.which("ip") or "/usr/sbin/ip"


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    """``ip args``, raising with its message when it fails."""
    result = subprocess.run([IP, *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def unavailable() -> str | None:
    """Why network namespaces cannot be made here (no ``ip``, no privilege), or None when they can."""
    if not Path(IP).is_file():
        return "iproute2's `ip` is not installed (setup.sh installs it with apt where it can)"
    probe = f"fl-probe-{secrets.token_hex(3)}"
    try:
        ip("netns", "add", probe)
    except RuntimeError as error:
        return f"cannot create a network namespace (needs root or CAP_NET_ADMIN): {error}"
    ip("netns", "del", probe)
    return None


class Network:
    """Hosts ``names`` as network namespaces on one bridge, each with an address on :data:`SUBNET`.

    A context manager: entering creates everything, leaving stops every process in
    the namespaces and deletes them, whatever happened inside.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.token = secrets.token_hex(3)
        self.fabric = f"fl-{self.token}-fabric"
        self.names = list(names)
        hosts = list(SUBNET.hosts())[FIRST_HOST - 1 :]
        self.addresses = {name: str(hosts[i]) for i, name in enumerate(self.names)}
        self.processes: list[subprocess.Popen] = []

    def namespace(self, host: str) -> str:
        """The namespace name of ``host``."""
        return f"fl-{self.token}-{host}"

    def _outer(self, host: str) -> str:
        """The fabric end of ``host``'s veth pair (at most 15 characters, unique within the fabric)."""
        return f"v{self.names.index(host)}"

    def create(self) -> None:
        """The fabric namespace with its bridge, then one namespace per host, linked and addressed."""
        ip("netns", "add", self.fabric)
        ip("-n", self.fabric, "link", "add", "br0", "type", "bridge")
        ip("-n", self.fabric, "link", "set", "br0", "up")
        for host in self.names:
            namespace = self.namespace(host)
            ip("netns", "add", namespace)
            # Both ends are born where they belong: the outer one in the fabric, the inner one in the host.
            ip("-n", self.fabric, "link", "add", self._outer(host), "type", "veth", "peer", "name", INTERFACE,
               "netns", namespace)  # fmt: skip
            ip("-n", self.fabric, "link", "set", self._outer(host), "master", "br0", "up")
            ip("-n", namespace, "addr", "add", f"{self.addresses[host]}/{SUBNET.prefixlen}", "dev", INTERFACE)
            ip("-n", namespace, "link", "set", INTERFACE, "up")
            ip("-n", namespace, "link", "set", "lo", "up")  # local services (a SuperNode's ClientApp API) use it

    def command(self, host: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``host``'s namespace."""
        return [IP, "netns", "exec", self.namespace(host), *argv]

    def popen(self, host: str, argv: Sequence[str], **kwargs: object) -> subprocess.Popen:
        """Start ``argv`` on ``host``; it is stopped on :meth:`destroy`."""
        process = subprocess.Popen(self.command(host, argv), **kwargs)  # type: ignore[call-overload]
        self.processes.append(process)
        return process

    def run(self, host: str, argv: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on ``host`` to completion, text output captured."""
        return subprocess.run(self.command(host, argv), capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]

    def cut(self, host: str) -> None:
        """Take ``host``'s link down (its packets are lost until :meth:`restore`)."""
        ip("-n", self.fabric, "link", "set", self._outer(host), "down")

    def restore(self, host: str) -> None:
        """Bring ``host``'s link back up."""
        ip("-n", self.fabric, "link", "set", self._outer(host), "up")

    def pids(self) -> list[int]:
        """Every process inside this network's namespaces (``ip netns pids``), daemons included."""
        found = []
        for namespace in [self.namespace(h) for h in self.names] + [self.fabric]:
            result = subprocess.run([IP, "netns", "pids", namespace], capture_output=True, text=True, check=False)
            found += [int(pid) for pid in result.stdout.split()]
        return found

    def exists(self) -> list[str]:
        """The namespaces of this network that exist now."""
        return [n for n in [self.namespace(h) for h in self.names] + [self.fabric] if Path("/run/netns", n).exists()]

    def destroy(self) -> None:
        """Stop every process started here or living in the namespaces, then delete the namespaces."""
        started = process_tree([p.pid for p in self.processes])
        stop_processes(sorted(set(started + self.pids())), timeout=5)
        for process in self.processes:
            process.wait()
        for namespace in self.exists():  # deleting a namespace deletes its interfaces
            subprocess.run([IP, "netns", "del", namespace], check=False)

    def __enter__(self) -> Network:
        try:
            self.create()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.destroy()
