"""A real Flower deployment on this machine: TLS, SuperNode authentication, N SuperNodes, one fedlora run.

``python -m simulations.deploy_local --nodes 2 -c "num-server-rounds=2 model.name='minilm'"``

Each step is a separate process, exactly what docs/deployment.md runs on
separate machines: keys and certificates (``fedlora pki``), a ``flower-superlink``
with TLS and ``--enable-supernode-auth``, node keys registered with ``flwr supernode
register``, ``flower-supernode`` processes (each starts a fresh ClientApp process
per message), ``flwr run . <connection>``; then everything is stopped by PID.
Runtime dependency installation stays off everywhere.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from fedlora.pki import create_ca, create_node_key, create_server_certificate
from simulations.run import ROOT, flwr_env, free_port, process_tree, stop_processes

CONNECTION = "fedlora-local"


class LocalDeployment:
    """SuperLink, SuperNodes and the ``flwr`` CLI of one deployment, with their files under ``work``."""

    def __init__(self, work: Path, address: str = "127.0.0.1", port: int | None = None) -> None:
        self.work = work.resolve()
        self.certs, self.keys, self.logs = self.work / "certs", self.work / "keys", self.work / "logs"
        self.address = address  # where the SuperLink listens and everyone reaches it
        # Flower 1.41 serves the Fleet, Control and Runtime APIs on one HTTPS port
        self.port = port or free_port()
        self.processes: list[subprocess.Popen] = []
        self.restarts: Counter[str] = Counter()  # starts per SuperNode log name (a restart logs to a new file)
        self.log_paths: dict[str, Path] = {}  # process name -> its log, the latest process of a name last
        self.env = flwr_env(self.work / "flwr")

    def where(self, host: str, argv: list[str]) -> list[str]:
        """``argv`` as run on ``host`` (``superlink``, ``operator``, a node's name): here, all on this machine."""
        return argv

    def create_keys(self, nodes: int) -> None:
        """CA, SuperLink certificate for its address (and localhost), one key pair per node; the CLI's config."""
        create_ca(self.certs)
        create_server_certificate(self.certs, ["localhost"], sorted({"127.0.0.1", self.address}))
        for i in range(nodes):
            create_node_key(self.keys, f"node-{i}")
        (self.work / "flwr").mkdir(parents=True, exist_ok=True)
        (self.work / "flwr" / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{self.address}:{self.port}"\nroot-certificates = "{self.certs / "ca.crt"}"\n'
        )

    def _start(self, name: str, host: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.log_paths[name] = self.logs / f"{name}.log"
        with open(self.log_paths[name], "w") as log:  # the child keeps its own descriptor
            process = subprocess.Popen(
                self.where(host, cmd),
                env={**self.env, **(env or {})},
                cwd=self.work,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.processes.append(process)
        return process

    def start_superlink(self) -> subprocess.Popen:
        """The SuperLink: TLS with the CA's server certificate, node authentication on, no dependency installs."""
        return self._start(
            "superlink",
            "superlink",
            [
                "flower-superlink",
                "--ssl-ca-certfile",
                str(self.certs / "ca.crt"),
                "--ssl-certfile",
                str(self.certs / "server.pem"),
                "--ssl-keyfile",
                str(self.certs / "server.key"),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--host",
                self.address,
                "--port",
                str(self.port),
                "--database",
                str(self.work / "superlink.db"),
            ],
        )

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI against this deployment's SuperLink."""
        return subprocess.run(
            self.where("operator", ["flwr", *args]),
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def register(self, name: str, attempts: int = 30) -> None:
        """``flwr supernode register <name>.pub`` (retried while the SuperLink starts)."""
        for _ in range(attempts):
            result = self.flwr("supernode", "register", str(self.keys / f"{name}.pub"), CONNECTION)
            if result.returncode == 0:
                return
            time.sleep(1)
        raise RuntimeError(f"could not register {name}: {result.stdout}{result.stderr}")

    def start_supernode(
        self,
        key: str | None,
        partition: int,
        partitions: int,
        tls: bool = True,
        node_config: str = "",
        env: dict[str, str] | None = None,
        retries: bool = False,
    ) -> subprocess.Popen:
        """A SuperNode on host ``key`` holding partition ``partition``, authenticating with key ``key``.

        ``key`` None: no key (on the host ``nokey``). ``node_config`` replaces the partition (e.g. its own
        ``data-path``); ``env`` adds variables (e.g. ``FEDLORA_STORE``). Without ``retries`` the node gives
        up after 3 failed connections or 20 s (a refused node must exit); with it, it reconnects forever
        (Flower's default), which a node whose link comes back needs.
        """
        security = ["--root-certificates", str(self.certs / "ca.crt")] if tls else ["--insecure"]
        auth = ["--auth-supernode-private-key", str(self.keys / key)] if key else []
        give_up = [] if retries else ["--max-retries", "3", "--max-wait-time", "20"]
        name = f"supernode-{partition}-{key or 'nokey'}-{'tls' if tls else 'plaintext'}"
        self.restarts[name] += 1
        return self._start(
            name if self.restarts[name] == 1 else f"{name}-{self.restarts[name]}",
            key or "nokey",
            [
                "flower-supernode",
                *security,
                *auth,
                "--superlink",
                f"{self.address}:{self.port}",
                "--node-config",
                node_config or f"partition-id={partition} num-partitions={partitions}",
                "--port",
                str(free_port()),
                *give_up,
            ],
            env,
        )

    def run(self, run_config: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        """``flwr run . fedlora-local --stream`` with ``run_config`` overrides."""
        return self.flwr(*self.run_args(run_config), timeout=timeout)

    def run_args(self, run_config: str) -> list[str]:
        """The ``flwr`` arguments of :meth:`run`."""
        return ["run", str(ROOT), CONNECTION, "--stream"] + (["--run-config", run_config] if run_config else [])

    def start_run(self, run_config: str, name: str = "run") -> subprocess.Popen:
        """:meth:`run` in the background, its output in ``logs/<name>.log``."""
        return self._start(name, "operator", ["flwr", *self.run_args(run_config)])

    def stop(self) -> None:
        """Stop every process this deployment started, with their children (ServerApp, ClientApps)."""
        stop_processes(process_tree([p.pid for p in self.processes]))
        for process in self.processes:
            process.wait()


def main() -> None:
    """Deploy on localhost, run once, stop."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "deployment")
    parser.add_argument("-c", "--run-config", default="")
    args = parser.parse_args()
    sys.exit(deploy_and_run(LocalDeployment(args.work), args.nodes, args.run_config))


def deploy_and_run(deployment: LocalDeployment, nodes: int, run_config: str) -> int:
    """Keys, SuperLink, ``nodes`` registered SuperNodes on partitions, one run (its log tail printed), stop all."""
    try:
        deployment.create_keys(nodes)
        deployment.start_superlink()
        for i in range(nodes):
            deployment.register(f"node-{i}")
            deployment.start_supernode(f"node-{i}", i, nodes)
        result = deployment.run(run_config)
        print(result.stdout[-4000:], result.stderr[-2000:])
    finally:
        deployment.stop()
    return result.returncode


if __name__ == "__main__":
    main()
