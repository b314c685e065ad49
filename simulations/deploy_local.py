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
from pathlib import Path

from fedlora.pki import create_ca, create_node_key, create_server_certificate
from simulations.run import ROOT, flwr_env, free_port, process_tree, stop_processes

CONNECTION = "fedlora-local"


class LocalDeployment:
    """SuperLink, SuperNodes and the ``flwr`` CLI of one deployment, with their files under ``work``."""

    def __init__(self, work: Path) -> None:
        self.work = work.resolve()
        self.certs, self.keys, self.logs = self.work / "certs", self.work / "keys", self.work / "logs"
        self.port = free_port()  # Flower 1.41 serves the Fleet, Control and Runtime APIs on one HTTPS port
        self.processes: list[subprocess.Popen] = []
        self.env = flwr_env(self.work / "flwr")

    def create_keys(self, nodes: int) -> None:
        """CA, SuperLink certificate for localhost, one key pair per node; the CLI's connection config."""
        create_ca(self.certs)
        create_server_certificate(self.certs, ["localhost"], ["127.0.0.1"])
        for i in range(nodes):
            create_node_key(self.keys, f"node-{i}")
        (self.work / "flwr").mkdir(parents=True, exist_ok=True)
        (self.work / "flwr" / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.certs / "ca.crt"}"\n'
        )

    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "w") as log:  # the child keeps its own descriptor
            process = subprocess.Popen(cmd, env=self.env, cwd=self.work, stdout=log, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def start_superlink(self) -> subprocess.Popen:
        """The SuperLink: TLS with the CA's server certificate, node authentication on, no dependency installs."""
        return self._start(
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
                "127.0.0.1",
                "--port",
                str(self.port),
                "--database",
                str(self.work / "superlink.db"),
            ],
        )

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI against this deployment's SuperLink."""
        return subprocess.run(
            ["flwr", *args], env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
        )

    def register(self, name: str, attempts: int = 30) -> None:
        """``flwr supernode register <name>.pub`` (retried while the SuperLink starts)."""
        for _ in range(attempts):
            result = self.flwr("supernode", "register", str(self.keys / f"{name}.pub"), CONNECTION)
            if result.returncode == 0:
                return
            time.sleep(1)
        raise RuntimeError(f"could not register {name}: {result.stdout}{result.stderr}")

    def start_supernode(self, key: str | None, partition: int, partitions: int, tls: bool = True) -> subprocess.Popen:
        """A SuperNode holding partition ``partition``, authenticating with key ``key`` (``None``: no key)."""
        security = ["--root-certificates", str(self.certs / "ca.crt")] if tls else ["--insecure"]
        auth = ["--auth-supernode-private-key", str(self.keys / key)] if key else []
        name = f"supernode-{partition}-{key or 'nokey'}-{'tls' if tls else 'plaintext'}"
        return self._start(
            name,
            [
                "flower-supernode",
                *security,
                *auth,
                "--superlink",
                f"127.0.0.1:{self.port}",
                "--node-config",
                f"partition-id={partition} num-partitions={partitions}",
                "--port",
                str(free_port()),
                "--max-retries",
                "3",
                "--max-wait-time",
                "20",
            ],
        )

    def run(self, run_config: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        """``flwr run . fedlora-local --stream`` with ``run_config`` overrides."""
        args = ["run", str(ROOT), CONNECTION, "--stream"] + (["--run-config", run_config] if run_config else [])
        return self.flwr(*args, timeout=timeout)

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
    deployment = LocalDeployment(args.work)
    try:
        deployment.create_keys(args.nodes)
        deployment.start_superlink()
        for i in range(args.nodes):
            deployment.register(f"node-{i}")
            deployment.start_supernode(f"node-{i}", i, args.nodes)
        result = deployment.run(args.run_config)
        print(result.stdout[-4000:], result.stderr[-2000:])
    finally:
        deployment.stop()
    sys.exit(result.returncode)


if __name__ == "__main__":
    main()
