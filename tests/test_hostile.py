"""Issue 12: no single client can crash, capture or wipe the server; resume refuses a checkpoint it cannot trust.

One section per class of the issue's examples: weights, update bounds and
robust aggregation, replies that used to crash a round, resume, private data,
config, PKI. Each test failed on the code before the issue was fixed.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import random
import re
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import reply
from cryptography import x509
from cryptography.x509.verification import DNSName, PolicyBuilder, Store
from flwr.app import Array, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from test_strategies import FakeGrid, configured, lora_state

from fedlora.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_resumable,
    fingerprint,
    load_checkpoint,
    save_checkpoint,
)
from fedlora.config import ConfigError, from_run_config
from fedlora.data.sources import load_local
from fedlora.keys import ARRAYS
from fedlora.models import CAUSAL_LM
from fedlora.pki import KeyExistsError, create_ca, create_node_key, create_server_certificate
from fedlora.robust import update_norm
from fedlora.wire import MANIFEST, PAYLOAD, from_record, to_record
from server_app.app import run_server
from strategies import FedAvgFactors, HetLoRA, build_strategy

pytestmark = pytest.mark.usefixtures("flower_identity")


def torch_state(state: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in state.items()}


def shifted(scale: float, seed: int = 0) -> dict[str, np.ndarray]:
    """The global adapter of :func:`configured` plus ``scale`` times a fixed unit-ish direction."""
    direction = lora_state(100 + seed)
    return {k: v + scale * direction[k] for k, v in lora_state(0).items()}


def warnings_about(caplog: pytest.LogCaptureFixture, node: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if f"node {node}" in r.getMessage()]


# --- Weights: num-examples is a positive integer, capped relative to the round's median ---------------------------


@pytest.mark.parametrize("claim", [0, -3, 2.5, math.nan, math.inf, 1.7e308, 2**60])
def test_a_num_examples_that_is_not_a_plausible_count_is_excluded(
    claim: object, caplog: pytest.LogCaptureFixture
) -> None:
    strategy = configured(FedAvgFactors)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, _ = strategy.aggregate_train(1, [reply(11, shifted(0.1)), reply(12, shifted(-0.1), claim)])
    assert any("excluded: metric 'num-examples' must be an integer" in m for m in warnings_about(caplog, 12))
    np.testing.assert_allclose(from_record(arrays)["head.weight"].numpy(), shifted(0.1)["head.weight"], rtol=1e-6)


def test_two_clients_near_the_float_limit_cannot_zero_the_global_adapter() -> None:
    strategy = configured(FedAvgFactors)
    replies = [reply(11, shifted(0.1), 1.7e308), reply(12, shifted(0.2), 1.7e308), reply(13, shifted(0.3))]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert from_record(arrays)["head.weight"].abs().sum() > 0


def test_one_client_claiming_a_trillion_examples_gets_at_most_the_capped_share() -> None:
    strategy = configured(FedAvgFactors)  # max-weight-ratio 10: share ≤ 10 / (10 + 2) among 3 clients
    honest = [reply(11 + i, shifted(0.0), 10) for i in range(2)]
    arrays, _ = strategy.aggregate_train(1, [*honest, reply(13, shifted(1.0), 10**12)])
    moved = from_record(arrays)["head.weight"].numpy() - shifted(0.0)["head.weight"]
    share = np.linalg.norm(moved) / np.linalg.norm(shifted(1.0)["head.weight"] - shifted(0.0)["head.weight"])
    assert share == pytest.approx(10 / 12, rel=1e-4)


def test_hetlora_norm_weighting_gives_a_huge_update_at_most_the_capped_share() -> None:
    strategy = HetLoRA()
    strategy.global_state = torch_state(lora_state(0))
    base = torch_state(lora_state(1))
    honest = dict(base)
    attacker = {**base, "m.q.lora_B.weight": 1000 * base["m.q.lora_B.weight"]}  # the same layer, ×1000
    states, weights = [attacker, honest, honest, honest], [1.0, 10.0, 10.0, 10.0]
    out = strategy.aggregate_states(1, states, weights)["m.q.lora_B.weight"]
    share = float((out - base["m.q.lora_B.weight"]).norm() / (999 * base["m.q.lora_B.weight"]).norm())
    assert share == pytest.approx(10 / 40, rel=1e-4)  # its norm counts for 10 × the median: 1·10 vs 10·1 each


# --- Update bounds: on by default, in the wire dtype; robust aggregation for a malicious minority -----------------


def test_a_finite_but_huge_update_is_excluded_by_default(caplog: pytest.LogCaptureFixture) -> None:
    strategy = build_strategy(from_run_config({}))
    strategy.configure_train(1, to_record(torch_state(lora_state(0))), ConfigRecord(), FakeGrid([11, 12]))
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, _ = strategy.aggregate_train(1, [reply(11, shifted(0.1)), reply(12, shifted(1e30))])
    assert any("exceeds max-update-norm 100" in m for m in warnings_about(caplog, 12))
    assert torch.isfinite(from_record(arrays)["head.weight"]).all()


def test_a_float32_reply_that_overflows_a_float16_wire_is_excluded(caplog: pytest.LogCaptureFixture) -> None:
    strategy = configured(FedAvgFactors)
    strategy.wire_dtype, strategy.max_update_norm = "float16", 0.0  # the wire check holds even with no norm bound
    big = lora_state(0)
    big["head.weight"][0, 0] = 1.4e5
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, _ = strategy.aggregate_train(1, [reply(11, shifted(0.1)), reply(12, big)])
    assert any("'head.weight' contains NaN or Inf" in m for m in warnings_about(caplog, 12))
    assert all(torch.isfinite(t).all() for t in from_record(arrays).values())


@pytest.mark.parametrize("mode", ["median", "trimmed-mean", "clip-to-median"])
def test_one_malicious_client_of_five_stays_within_the_stated_distance(mode: str) -> None:
    """Honest clients move the adapter by small, different steps; client 15 by a large one (under max-update-norm).

    Stated distance from the honest clients' mean: for the median and trimmed
    mean, each coordinate stays within the honest clients' range, so at most the
    norm of the per-coordinate spread; for clip-to-median, the malicious update
    is cut to the median norm M, so at most (M + ‖honest mean update‖) / 5.
    """
    honest = [shifted(0.05 * (i + 1), seed=i) for i in range(4)]
    malicious = shifted(10.0, seed=9)  # update norm ≈ 87: under the default max-update-norm

    def aggregate(robust: str) -> dict[str, torch.Tensor]:
        strategy = configured(FedAvgFactors)
        strategy.configure_train(
            1, to_record(torch_state(lora_state(0))), ConfigRecord(), FakeGrid([11, 12, 13, 14, 15])
        )
        strategy.robust = robust
        arrays, _ = strategy.aggregate_train(1, [reply(11 + i, s) for i, s in enumerate([*honest, malicious])])
        return from_record(arrays)

    honest_mean = {k: torch.from_numpy(np.mean([h[k] for h in honest], axis=0)) for k in honest[0]}
    sent = torch_state(lora_state(0))

    def distance(state: dict[str, torch.Tensor]) -> float:
        return update_norm(state, honest_mean)

    if mode == "clip-to-median":
        norms = sorted(update_norm(torch_state(s), sent) for s in [*honest, malicious])
        bound = (norms[2] + update_norm(honest_mean, sent)) / 5
    else:
        spread = {k: np.max([np.abs(h[k] - honest_mean[k].numpy()) for h in honest], axis=0) for k in honest[0]}
        bound = math.sqrt(sum(float((v**2).sum()) for v in spread.values()))
    assert distance(aggregate(mode)) <= bound * (1 + 1e-5)
    assert distance(aggregate("none")) > 5 * bound  # without it, the malicious client drags the average away


# --- Any reply is data: what used to raise out of aggregate_train / aggregate_evaluate ----------------------------


def empty_payload() -> Message:
    message = reply(12, shifted(0.2))
    message.content[ARRAYS][PAYLOAD] = Array(dtype="float32", shape=(74,), stype="numpy.ndarray", data=b"")
    return message


def truncated_payload() -> Message:
    message = reply(12, shifted(0.2))
    record = message.content[ARRAYS]
    record[PAYLOAD] = Array(record[PAYLOAD].numpy()[:-1])
    return message


def garbled_manifest() -> Message:
    message = reply(12, shifted(0.2))
    message.content[ARRAYS][MANIFEST] = Array(np.frombuffer(b"not a manifest", np.uint8))
    return message


def oversized() -> Message:
    message = reply(12, shifted(0.2))  # its manifest still says 74 values: decoded, the payload would be refused too
    message.content[ARRAYS][PAYLOAD] = Array(np.zeros(1_000_000, np.float32))
    return message


@pytest.mark.parametrize(
    "bad, reason",
    [
        (empty_payload, r"array 'tensors' cannot be read \(EOFError"),
        (truncated_payload, "the manifest describes 74 values, the payload holds 73"),
        (garbled_manifest, "the manifest cannot be decompressed"),
        (oversized, r"the reply's arrays are 4000\d{3} bytes, more than the \d{4} the adapter sent can take"),
    ],
)
def test_a_malformed_array_payload_excludes_only_its_reply(bad, reason: str, caplog: pytest.LogCaptureFixture) -> None:
    strategy = configured(FedAvgFactors)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, _ = strategy.aggregate_train(1, [reply(11, shifted(0.1)), bad()])
    assert any(re.search(reason, m) for m in warnings_about(caplog, 12)), warnings_about(caplog, 12)
    np.testing.assert_allclose(from_record(arrays)["head.weight"].numpy(), shifted(0.1)["head.weight"], rtol=1e-6)


@pytest.mark.parametrize(
    "metrics, dropped, loss",
    [
        ([{"train-loss": [1.0, 2.0]}, {"train-loss": 3.0}], "[1.0, 2.0] is not a finite number", 3.0),
        ([{"acc": [1.0, 2.0]}, {"acc": [1.0]}], "[1.0] is not a finite number", 1.0),
        ([{"train-loss": math.nan}, {"train-loss": 3.0}], "nan is not a finite number", 3.0),
    ],
)
def test_bad_metrics_are_dropped_with_a_reason_and_the_rest_averaged(
    metrics: list[dict], dropped: str, loss: float, caplog: pytest.LogCaptureFixture
) -> None:
    strategy = configured(FedAvgFactors)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, out = strategy.aggregate_train(1, [reply(11 + i, shifted(0.1), 10, **m) for i, m in enumerate(metrics)])
    assert arrays is not None and any(dropped in r.getMessage() for r in caplog.records)
    assert all(isinstance(v, int | float) and math.isfinite(v) for v in out.values())
    assert out["train-loss"] == loss and "acc" not in out


def evaluation(node: int, num_examples: object, **metrics: object) -> Message:
    TaskIdentity.node_id = node
    content = RecordDict({"metrics": MetricRecord({"num-examples": num_examples, **metrics})})
    return Message(content=content, dst_node_id=0, message_type="evaluate")


def test_an_evaluation_claiming_a_trillion_examples_and_zero_loss_is_capped() -> None:
    strategy = configured(FedAvgFactors)
    honest = [evaluation(11 + i, 10, **{"eval-loss": 2.0}) for i in range(4)]
    metrics = strategy.aggregate_evaluate(1, [*honest, evaluation(15, 10**12, **{"eval-loss": 0.0})])
    assert metrics["eval-loss"] == pytest.approx(2.0 * 40 / 140)  # weight 100 (10 × median) against 4 × 10


def test_a_failing_aggregation_keeps_the_global_adapter_and_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(FedAvgFactors):
        def aggregate_states(self, server_round, states, weights):
            raise RuntimeError("strategy bug")

    strategy = configured(Broken)
    with caplog.at_level(logging.ERROR, logger="flwr"):
        assert strategy.aggregate_train(1, [reply(11, shifted(0.1))]) == (None, None)
    assert any("aggregation failed, the global adapter stays" in r.getMessage() for r in caplog.records)


# --- Resume: fingerprint, shapes, round range, fallback, no checkpoint, fsync --------------------------------------

RANK8 = {"adapter.r": 8, "num-server-rounds": 3}


def write(folder: Path, server_round: int, overrides: dict, rank: int = 8) -> None:
    cfg = from_run_config(overrides)
    arrays = to_record(torch_state(lora_state(0, rank)))
    metrics = [{"round": r} for r in range(server_round + 1)]
    save_checkpoint(folder, Checkpoint(server_round, arrays, {}, metrics, random.getstate(), fingerprint(cfg)))


@pytest.mark.parametrize(
    "written, message",
    [
        ({**RANK8, "adapter.r": 4}, r"adapter\.r=4 there, 8 here"),
        ({**RANK8, "strategy.name": "fedavg-products"}, "strategy.name='fedavg-products' there"),
        ({**RANK8, "train.lr": 0.001}, "train.lr=0.001 there, 0.0005 here"),
        ({**RANK8, "seed": 7}, "seed=7 there, 42 here"),
        ({**RANK8, "wire.dtype": "float16"}, "wire.dtype='float16' there"),
    ],
)
def test_a_checkpoint_of_other_settings_is_refused_naming_file_and_key(
    tmp_path: Path, written: dict, message: str
) -> None:
    write(tmp_path / "checkpoint", 1, written)
    with pytest.raises(CheckpointError, match=rf"{tmp_path}/checkpoint/state.json was written .*{message}"):
        check_resumable(load_checkpoint(tmp_path / "checkpoint"), from_run_config(RANK8), torch_state(lora_state(0, 8)))


def test_a_setting_the_checkpoint_predates_matches_only_at_its_default(tmp_path: Path) -> None:
    """A checkpoint written before a setting existed (a method added since) resumes while the run keeps its default."""
    write(tmp_path / "checkpoint", 1, RANK8)
    checkpoint = load_checkpoint(tmp_path / "checkpoint")
    del checkpoint.fingerprint["loramoe.experts"], checkpoint.fingerprint["adapter.dropout"]
    check_resumable(checkpoint, from_run_config(RANK8), torch_state(lora_state(0, 8)))
    with pytest.raises(CheckpointError, match=r"adapter\.dropout='\(absent\)' there, 0\.1 here"):
        check_resumable(checkpoint, from_run_config({**RANK8, "adapter.dropout": 0.1}), torch_state(lora_state(0, 8)))


def test_an_adapter_of_another_rank_is_refused(tmp_path: Path) -> None:
    write(tmp_path / "checkpoint", 1, RANK8, rank=4)
    with pytest.raises(CheckpointError, match=r"state.json: its adapter does not fit .*rank 4, but it was sent rank 8"):
        check_resumable(load_checkpoint(tmp_path / "checkpoint"), from_run_config(RANK8), torch_state(lora_state(0, 8)))


@pytest.mark.parametrize("server_round", [-5, 99])
def test_a_round_outside_the_run_is_refused(tmp_path: Path, server_round: int) -> None:
    write(tmp_path / "checkpoint", 1, RANK8)
    state_file = tmp_path / "checkpoint" / "state.json"
    checkpoint = load_checkpoint(tmp_path / "checkpoint")
    checkpoint.server_round = server_round
    with pytest.raises(CheckpointError, match=rf"{state_file}: round {server_round} is outside 0..num-server-rounds=3"):
        check_resumable(checkpoint, from_run_config(RANK8), torch_state(lora_state(0, 8)))
    checkpoint.server_round, checkpoint.metrics = 0, [{"round": 0}]  # after the initial evaluation: resumable
    check_resumable(checkpoint, from_run_config(RANK8), torch_state(lora_state(0, 8)))


@pytest.mark.parametrize(
    "damage",
    [
        lambda state: state.replace('"round": 2', '"round": 0', 1),  # metrics edited by hand
        lambda state: state[: len(state) // 2],  # torn write
        lambda state: "",
    ],
)
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path: Path, damage) -> None:
    folder = tmp_path / "checkpoint"
    write(folder, 1, RANK8)
    write(folder, 2, RANK8)
    (folder / "state.json").write_text(damage((folder / "state.json").read_text()))
    assert load_checkpoint(folder).server_round == 1
    (tmp_path / "checkpoint.old" / "state.json").write_text("{}")
    with pytest.raises(CheckpointError, match=rf"no usable checkpoint: {folder}/state.json"):
        load_checkpoint(folder)


def test_resume_without_a_checkpoint_is_an_error(tmp_path: Path) -> None:
    cfg = from_run_config({"resume": True, "output-dir": str(tmp_path / "out")})
    with pytest.raises(CheckpointError, match=rf"resume=true but there is no checkpoint in {tmp_path}/out/checkpoint"):
        run_server(FakeGrid([]), cfg)


def test_checkpoint_files_and_folder_are_fsynced_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(
        os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))
    )
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", str(a))), real_rename(a, b)))
    write(tmp_path / "checkpoint", 1, RANK8)
    partial = str(tmp_path / "checkpoint.partial")
    swap = events.index(("rename", partial))
    synced = {path for kind, path in events[:swap] if kind == "fsync"}
    assert {partial, f"{partial}/state.json", f"{partial}/adapter.safetensors"} <= synced
    assert ("fsync", str(tmp_path)) in events[swap:]


# --- Private data: a node's data-path never lands in the shared datasets cache -------------------------------------


def test_a_nodes_data_file_is_not_copied_into_the_datasets_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hf-datasets-cache"
    cache.mkdir()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    private = tmp_path / "private.jsonl"
    private.write_text("\n".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) for i in range(5)))
    private.chmod(0o600)
    assert load_local(private, CAUSAL_LM)["prompt"] == [f"q{i}" for i in range(5)]
    assert list(cache.rglob("*")) == []


# --- Config: ranges, and a strategy path checked before its module runs --------------------------------------------


@pytest.mark.parametrize(
    "override",
    [
        {"adapter.r": 100000},
        {"train.lr": 1e6},
        {"adapter.alpha": math.inf},
        {"max-update-norm": math.inf},
        {"seed": -1},
        {"data.dirichlet-alpha": math.inf},
        {"max-weight-ratio": 0.5},
        {"strategy.trim-fraction": 0.5},
    ],
)
def test_out_of_range_config_is_refused_naming_the_key(override: dict) -> None:
    ((key, value),) = override.items()
    with pytest.raises(ConfigError, match=f"out of range: {key}={value!r}"):
        from_run_config(override)


def test_min_replies_above_the_nodes_that_can_be_sampled_is_an_error() -> None:
    strategy = configured(FedAvgFactors)
    strategy.min_replies = 5
    with pytest.raises(ConfigError, match=r"min-replies=5 but only 3 client\(s\) can be sampled"):
        strategy.configure_train(1, to_record(torch_state(lora_state(0))), ConfigRecord(), FakeGrid([11, 12, 13]))


def test_a_strategy_path_without_the_class_is_refused_before_its_module_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "module-ran"
    (tmp_path / "hostile_strategy_module.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="defines no 'Missing'"):
        build_strategy(from_run_config({"strategy.name": "hostile_strategy_module:Missing"}))
    assert not marker.exists()


# --- PKI --------------------------------------------------------------------------------------------------------


def test_certificates_pass_strict_verification_with_key_identifiers(tmp_path: Path) -> None:
    create_ca(tmp_path)
    create_server_certificate(tmp_path, ["localhost"], [])
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    verifier = (
        PolicyBuilder().store(Store([ca])).time(dt.datetime.now(dt.UTC)).build_server_verifier(DNSName("localhost"))
    )
    verifier.verify(server, [])
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert server.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == ski


def test_replacing_the_ca_is_refused_while_its_server_certificate_exists(tmp_path: Path) -> None:
    create_ca(tmp_path)
    create_server_certificate(tmp_path, ["localhost"], [])
    before = (tmp_path / "ca.crt").read_bytes()
    with pytest.raises(KeyExistsError, match=r"server\.pem is signed by the CA .* would invalidate it"):
        create_ca(tmp_path, force=True)
    assert (tmp_path / "ca.crt").read_bytes() == before
    (tmp_path / "server.pem").unlink()
    create_ca(tmp_path, force=True)
    assert (tmp_path / "ca.crt").read_bytes() != before


@pytest.mark.parametrize("name", ["../x", "/etc/x", "a/b", ".hidden", "", "x" * 65])
def test_a_node_name_that_is_not_a_plain_file_name_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="node name"):
        create_node_key(tmp_path / "keys", name)
    assert not (tmp_path / "x").exists() and not (tmp_path / "keys").exists()


@pytest.mark.parametrize(
    "hosts, ips, message",
    [
        (["../x"], [], "not a valid DNS name"),
        (["bad host"], [], "not a valid DNS name"),
        (["-lead.example.org"], [], "not a valid DNS name"),
        (["a" * 64 + ".org"], [], "not a valid DNS name"),
        ([], ["10.0.0.300"], "not an IP address"),
    ],
)
def test_host_names_and_ips_are_validated(tmp_path: Path, hosts: list[str], ips: list[str], message: str) -> None:
    create_ca(tmp_path)
    with pytest.raises(ValueError, match=message):
        create_server_certificate(tmp_path, hosts, ips)
    assert not (tmp_path / "server.pem").exists()
