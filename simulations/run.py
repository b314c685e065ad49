"""Run fedlora through ``flwr run`` on a local simulation SuperLink, offline, and stop it afterwards.

``python -m simulations.run --clients 4 -c "num-server-rounds=2 model.name='minilm'"``

``flwr run`` starts a local SuperLink in the background that outlives the run;
this wrapper gives it a private ``FLWR_HOME`` and ports of its own (so that
several runs can share the machine), turns off telemetry and the per-run
dependency installation (no internet here), streams the run's logs and stops
that SuperLink by PID when the run ends.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

ROOT = Path(__file__).resolve().parents[1]
# Simulations hold this file shared, so any number run at once; a benchmark's timed runs hold it exclusively, so
# no fedlora simulation competes with them for the CPU (simulations/bench_scale.py). Older checkouts take it
# exclusively around every run, which keeps them and these runs apart.
MACHINE_LOCK = Path(tempfile.gettempdir()) / "fedlora-local-superlink.lock"
# One lock file per port a local SuperLink of ours is about to bind or holds.
PORT_LOCKS = Path(tempfile.gettempdir()) / "fedlora-ports"


def flwr_env(flwr_home: Path) -> dict[str, str]:
    """Environment for an offline local simulation with its own Flower home."""
    return {
        **os.environ,
        # `flwr run` starts `flower-superlink` by name: find it beside this interpreter.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        # Offline unless the caller says otherwise: HF_HUB_OFFLINE=0 lets a Hugging Face model or dataset id download.
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "HF_DATASETS_OFFLINE": os.environ.get("HF_DATASETS_OFFLINE", "1"),
    }


@contextmanager
def machine_lock(exclusive: bool = False) -> Iterator[None]:
    """Hold :data:`MACHINE_LOCK`: shared for a simulation, exclusive for a benchmark's timed runs."""
    with open(MACHINE_LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield  # closing the file releases the lock


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def reserved_ports(count: int) -> Iterator[list[int]]:
    """``count`` distinct free ports, each locked (:data:`PORT_LOCKS`) until the block ends.

    A port that is free now can be picked by another fedlora run before our
    SuperLink binds it; whoever locks it first keeps it, the other picks again.
    """
    PORT_LOCKS.mkdir(exist_ok=True)
    with ExitStack() as held:
        ports: list[int] = []
        while len(ports) < count:
            port = free_port()
            try:  # a port we already hold fails here too: flock is per open file
                held.enter_context(FileLock(PORT_LOCKS / f"{port}.lock", timeout=0))
            except Timeout:
                continue
            ports.append(port)
        yield ports


@contextmanager
def local_superlink(flwr_home: Path) -> Iterator[dict[str, str]]:
    """The environment for ``flwr run`` with a local SuperLink of its own; that SuperLink is stopped on exit.

    ``flwr run`` starts its local SuperLink on the ports in ``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` and
    ``FLWR_LOCAL_CONTROL_API_PORT`` (39091 and 39093 unless set, where two runs would collide). Only what
    collides is locked: those ports, and the Flower home, whose database and SuperLink (found by its path)
    one run at a time may own. A SuperLink a crashed run of this home left behind is stopped first.
    """
    flwr_home = flwr_home.resolve()
    flwr_home.mkdir(parents=True, exist_ok=True)
    with FileLock(flwr_home / "fedlora-run.lock"), reserved_ports(2) as (http_port, control_port):
        stop_superlink(flwr_home)
        env = {
            **flwr_env(flwr_home),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
            "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        }
        try:
            yield env
        finally:
            stop_superlink(flwr_home)


def _process_table() -> dict[int, tuple[int, str]]:
    """Every process: pid -> (parent pid, command line)."""
    table = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace").replace("\0", " ")
            except OSError:
                continue
            table[int(proc.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmdline)
    return table


def process_tree(roots: list[int]) -> list[int]:
    """``roots`` and all their descendants."""
    table = _process_table()
    tree, frontier = list(roots), list(roots)
    while frontier:
        frontier = [pid for pid, (ppid, _) in table.items() if ppid in frontier]
        tree += frontier
    return tree


def superlink_pids(flwr_home: Path | None = None) -> list[int]:
    """PIDs of local SuperLinks and of every process under them.

    With ``flwr_home``, only the SuperLink keeping its state there. The simulation
    process and its Ray workers are included: they outlive a SuperLink stopped alone.
    """
    marker = f" {flwr_home.resolve() / 'local-superlink'}/" if flwr_home else ""  # its --log-file argument
    links = [pid for pid, (_, cmd) in _process_table().items() if "bin/flower-superlink" in cmd and marker in cmd]
    return process_tree(links)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").is_file() and ") Z " not in Path(f"/proc/{pid}/stat").read_text()


def stop_processes(pids: list[int], timeout: float = 10.0) -> None:
    """SIGTERM ``pids``, then SIGKILL whatever is still alive after ``timeout`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        pids = [pid for pid in pids if _alive(pid)]
        if not pids:
            return


def kill_tree(roots: list[int]) -> list[int]:
    """SIGKILL ``roots`` and all their descendants at once (a crash, not a shutdown); the PIDs killed."""
    tree = process_tree(roots)
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    stop_processes(tree, timeout=5)  # waits until they are gone
    return tree


def stop_superlink(flwr_home: Path, timeout: float = 10.0) -> None:
    """Stop the local SuperLink of ``flwr_home`` and everything it started."""
    stop_processes(superlink_pids(flwr_home), timeout)


def run_config_arg(overrides: dict[str, object]) -> str:
    """Render run-config overrides the way ``flwr run --run-config`` expects them (TOML values)."""

    def toml(value: object) -> str:
        if isinstance(value, bool):
            return str(value).lower()
        return f"'{value}'" if isinstance(value, str) else str(value)

    return " ".join(f"{key}={toml(value)}" for key, value in overrides.items())


def flwr_command(run_config: str = "", num_supernodes: int = 4, federation_config: str = "") -> list[str]:
    """The ``flwr run . --stream`` command line for ``run_config`` overrides.

    ``federation_config`` adds simulation keys (``client-resources-num-cpus=1
    init-args-num-cpus=2``, see docs/simulation.md) to ``num-supernodes``.
    """
    cmd = [str(Path(sys.executable).parent / "flwr"), "run", str(ROOT), "--stream"]
    cmd += ["--federation-config", f"num-supernodes={num_supernodes} {federation_config}".strip()]
    return cmd + (["--run-config", run_config] if run_config else [])


def flwr_run(
    run_config: str = "",
    num_supernodes: int = 4,
    flwr_home: Path | None = None,
    timeout: float | None = None,
    capture: bool = False,
    federation_config: str = "",
) -> subprocess.CompletedProcess[str]:
    """``flwr run . --stream`` with ``run_config`` overrides on its own local SuperLink, stopped afterwards."""
    with machine_lock(), local_superlink(flwr_home or ROOT / ".flwr") as env:
        return subprocess.run(
            flwr_command(run_config, num_supernodes, federation_config),
            env=env,
            cwd=ROOT,
            timeout=timeout,
            text=True,
            capture_output=capture,
            check=False,
        )


def run_and_read(overrides: dict[str, object], clients: int) -> tuple[list[dict], float]:
    """``flwr run`` with ``overrides`` (which must set ``output-dir``); its metrics.json rounds and wall seconds."""
    started = time.monotonic()
    run = flwr_run(run_config_arg(overrides), clients, capture=True)
    wall = time.monotonic() - started
    if run.returncode != 0:
        raise RuntimeError(f"flwr run failed with {overrides}:\n{(run.stdout + run.stderr)[-3000:]}")
    return json.loads((Path(str(overrides["output-dir"])) / "metrics.json").read_text())["rounds"], wall


def main() -> None:
    """Command line: number of virtual clients and run-config overrides."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4, help="virtual clients (num-supernodes, or cohort.clients)")
    parser.add_argument(
        "--cohort",
        type=int,
        default=0,
        metavar="K",
        help="train the clients in cohorts of K on --workers worker nodes (cohort.clients = --clients)",
    )
    parser.add_argument("--workers", type=int, default=1, help="worker nodes with --cohort (num-supernodes)")
    parser.add_argument("-c", "--run-config", default="", help='overrides, e.g. "num-server-rounds=2"')
    parser.add_argument(
        "-f", "--federation-config", default="", help='simulation keys, e.g. "client-resources-num-cpus=1"'
    )
    args = parser.parse_args()
    run_config, nodes = args.run_config, args.clients
    if args.cohort:
        run_config, nodes = f"{run_config} cohort.clients={args.clients} cohort.size={args.cohort}", args.workers
    started = time.monotonic()
    result = flwr_run(run_config.strip(), nodes, federation_config=args.federation_config)
    print(f"[fedlora] flwr run finished in {time.monotonic() - started:.0f}s with exit code {result.returncode}")
    sys.exit(result.returncode)


if __name__ == "__main__":
    main()
