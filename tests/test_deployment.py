"""A real deployment on localhost: flower-superlink with TLS and node authentication, flower-supernodes.

Two registered nodes with TLS train 2 rounds; a node with an unregistered key and a
node without TLS are refused. Every process is stopped by PID, with bounded waits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora import runtime
from fedlora.adapter import adapter_state
from fedlora.config import from_run_config
from fedlora.wire import record_nbytes, to_record
from simulations.deploy_local import LocalDeployment
from simulations.run import run_config_arg

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # SuperLink and SuperNode processes


@pytest.fixture
def deployment(tmp_path: Path) -> LocalDeployment:
    deployment = LocalDeployment(tmp_path / "deployment")
    yield deployment
    deployment.stop()


def test_tls_authenticated_deployment_trains_and_refuses_strangers(
    deployment: LocalDeployment, tiny_llama: Path
) -> None:
    deployment.create_keys(3)  # node-2's key is never registered
    deployment.start_superlink()
    for i in (0, 1):
        deployment.register(f"node-{i}")
        deployment.start_supernode(f"node-{i}", i, 2)
    stranger = deployment.start_supernode("node-2", 0, 2)  # TLS, but its key was never registered
    plaintext = deployment.start_supernode(None, 1, 2, tls=False)  # tries the TLS port in plain text

    output = deployment.work / "out"
    overrides = {
        "model.name": str(tiny_llama),
        "data.source": "chatterbot",
        "data.test-size": 40,
        "data.max-examples": 400,
        "num-server-rounds": 2,
        "train.local-steps": 4,
        "train.lr": 0.01,
        "fraction-evaluate": 0.0,
        "adapter.target-modules": "q_proj,v_proj",
        "output-dir": str(output),
    }
    result = deployment.run(run_config_arg(overrides), timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rounds = json.loads((output / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    message = record_nbytes(to_record(adapter_state(runtime.workbench(from_run_config(overrides)).model)))
    for entry in rounds[1:]:  # exactly the two registered TLS nodes trained
        assert entry["bytes-up"] == entry["bytes-down"] == 2 * message
    assert (output / "adapter" / "adapter_model.safetensors").is_file()

    assert stranger.wait(timeout=120) != 0, "a node with an unregistered key was let in"
    assert plaintext.wait(timeout=120) != 0, "a node without TLS was let in"
    superlink_log = (deployment.logs / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in superlink_log
    assert superlink_log.count("Activated node_id") == 2
