"""Run fedlora through ``flwr run`` on a local simulation SuperLink, offline, and stop it afterwards.

``python -m simulations.run --clients 4 -c "num-server-rounds=2 model.name='minilm'"``

``flwr run`` starts a local SuperLink in the background that outlives the run;
this wrapper gives it a private ``FLWR_HOME``, turns off telemetry and the
per-run dependency installation (no internet here), streams the run's logs and
stops that SuperLink by PID when the run ends.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def flwr_env(flwr_home: Path) -> dict[str, str]:
    """Environment for an offline local simulation with its own Flower home."""
    return {
        **os.environ,
        # `flwr run` starts `flower-superlink` by name: find it beside this interpreter.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }


def _cmdlines() -> dict[int, list[str]]:
    lines = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                lines[int(proc.name)] = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
    return lines


def superlink_pids(flwr_home: Path | None = None) -> list[int]:
    """PIDs of local SuperLinks and of the simulation processes they started.

    With ``flwr_home``, only the SuperLink keeping its state there. Its children
    (``--parent-pid``) are included because they outlive a stopped SuperLink.
    """
    cmdlines = _cmdlines()
    marker = str(flwr_home / "local-superlink") if flwr_home else ""
    links = [
        pid
        for pid, cmd in cmdlines.items()
        if any(part.endswith("flower-superlink") for part in cmd) and marker in " ".join(cmd)
    ]
    children = [
        pid
        for pid, cmd in cmdlines.items()
        if "--parent-pid" in cmd and cmd[cmd.index("--parent-pid") + 1 :][:1] in ([str(p)] for p in links)
    ]
    return links + children


def stop_superlink(flwr_home: Path, timeout: float = 10.0) -> None:
    """Terminate the local SuperLink of ``flwr_home`` (SIGTERM, then SIGKILL after ``timeout``)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = superlink_pids(flwr_home)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while superlink_pids(flwr_home) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not superlink_pids(flwr_home):
            return


def flwr_run(
    run_config: str = "",
    num_supernodes: int = 4,
    flwr_home: Path | None = None,
    timeout: float | None = None,
    capture: bool = False,
) -> subprocess.CompletedProcess[str]:
    """``flwr run . --stream`` with ``run_config`` overrides; the SuperLink is stopped afterwards."""
    flwr_home = flwr_home or ROOT / ".flwr"
    foreign = sorted(set(superlink_pids()) - set(superlink_pids(flwr_home)))
    if foreign:
        raise RuntimeError(
            f"another local Flower SuperLink is running (PID {', '.join(map(str, foreign))}) and holds the "
            "ports `flwr run` uses; stop it first (kill PID)"
        )
    cmd = [
        str(Path(sys.executable).parent / "flwr"),
        "run",
        str(ROOT),
        "--stream",
        "--federation-config",
        f"num-supernodes={num_supernodes}",
    ]
    if run_config:
        cmd += ["--run-config", run_config]
    try:
        return subprocess.run(
            cmd, env=flwr_env(flwr_home), cwd=ROOT, timeout=timeout, text=True, capture_output=capture, check=False
        )
    finally:
        stop_superlink(flwr_home)


def main() -> None:
    """Command line: number of virtual clients and run-config overrides."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4, help="virtual clients (num-supernodes)")
    parser.add_argument("-c", "--run-config", default="", help='overrides, e.g. "num-server-rounds=2"')
    args = parser.parse_args()
    started = time.monotonic()
    result = flwr_run(args.run_config, args.clients)
    print(f"[fedlora] flwr run finished in {time.monotonic() - started:.0f}s with exit code {result.returncode}")
    sys.exit(result.returncode)


if __name__ == "__main__":
    main()
