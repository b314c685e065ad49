"""simulations.run: each local simulation gets its own Flower home and ports, so runs can overlap."""

from __future__ import annotations

import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from e2e import simulate

from simulations import run
from simulations.run import (
    flwr_env,
    free_port,
    local_superlink,
    machine_lock,
    process_tree,
    reserved_ports,
    stop_processes,
)

PORTS = ("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "FLWR_LOCAL_CONTROL_API_PORT")


def test_overlapping_runs_get_their_own_home_and_ports(tmp_path: Path) -> None:
    with local_superlink(tmp_path / "a") as first, local_superlink(tmp_path / "b") as second:
        assert first["FLWR_HOME"] != second["FLWR_HOME"]
        ports = [int(env[key]) for env in (first, second) for key in PORTS]
        assert len(set(ports)) == 4, ports


def test_a_port_held_by_another_run_is_not_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    with reserved_ports(1) as (held,):
        offers = iter([held])  # as if the kernel offered it again before that run's SuperLink bound it
        monkeypatch.setattr(run, "free_port", lambda: next(offers, None) or free_port())
        with reserved_ports(1) as (other,):
            assert other != held


@pytest.mark.e2e
@pytest.mark.slow
def test_two_simulations_run_at_once_beside_a_foreign_superlink(tmp_path: Path, tiny_llama: Path) -> None:
    overrides = {
        "model.name": str(tiny_llama),
        "data.source": "chatterbot",
        "data.test-size": 20,
        "data.max-examples": 200,
        "num-server-rounds": 1,
        "train.local-steps": 2,
        "fraction-evaluate": 0.0,
        "adapter.target-modules": "q_proj,v_proj",
    }
    foreign_home = tmp_path / "foreign"
    command = ["flower-superlink", "--insecure", "--simulation", "--port", str(free_port())]
    # Shared hold, as every fedlora run keeps while its SuperLink lives: older checkouts refuse any SuperLink.
    with machine_lock():
        foreign = subprocess.Popen(
            command, env=flwr_env(foreign_home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            with ThreadPoolExecutor(2) as pool:
                runs = list(pool.map(lambda name: simulate(tmp_path / name, overrides, clients=2), ["one", "two"]))
            assert foreign.poll() is None, "the foreign SuperLink was stopped"
        finally:
            stop_processes(process_tree([foreign.pid]))
            foreign.wait()
    ports = set()
    for name, (_, rounds) in zip(["one", "two"], runs):
        assert [r["round"] for r in rounds] == [0, 1]
        # Each run started a SuperLink of its own (one that reached the other's would have no log) on its own port.
        log = (tmp_path / name / "flwr" / "local-superlink" / "superlink.log").read_text()
        ports.add(re.search(r"Runtime HTTP API on 127\.0\.0\.1:(\d+)", log).group(1))
    assert len(ports) == 2 and "39091" not in ports, ports  # 39091: Flower's default, shared by every run
