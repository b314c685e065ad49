"""Reward models: the Bradley-Terry loss and pairwise accuracy, the preference pairs, and batches of pairs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from e2e import check_run, simulate

from fedlora import runtime
from fedlora.config import from_run_config
from fedlora.data.preferences import REJECTED, preference_pairs
from fedlora.reward import bradley_terry_loss, pair_rewards, pairs_ranked_right
from fedlora.training import batch_loss, evaluate


def test_bradley_terry_loss_and_pairwise_accuracy_on_hand_made_rewards() -> None:
    chosen, rejected = torch.tensor([2.0, 0.0, 1.0, 5.0]), torch.tensor([0.0, 0.0, 3.0, -1.0])
    by_hand = [math.log1p(math.exp(-2.0)), math.log(2.0), math.log1p(math.exp(2.0)), math.log1p(math.exp(-6.0))]
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(sum(by_hand) / 4)
    assert bradley_terry_loss(chosen, rejected, reduction="sum").item() == pytest.approx(sum(by_hand))
    assert pairs_ranked_right(chosen, rejected) == 2  # the tie counts as wrong
    assert bradley_terry_loss(rejected, chosen).item() > bradley_terry_loss(chosen, rejected).item()


def test_pairs_reject_an_answer_of_another_category_drawn_from_the_seed() -> None:
    data = Dataset.from_dict(
        {
            "prompt": [f"q{i}" for i in range(30)],
            "response": [f"a{i}" for i in range(30)],
            "label": [i % 3 for i in range(30)],
        }
    )
    pairs = preference_pairs(data, seed=7)
    owner = {f"a{i}": i % 3 for i in range(30)}
    assert all(owner[row[REJECTED]] != row["label"] for row in pairs)
    assert pairs[REJECTED] == preference_pairs(data, seed=7)[REJECTED]
    assert pairs[REJECTED] != preference_pairs(data, seed=8)[REJECTED]
    with pytest.raises(ValueError, match="at least two categories"):
        preference_pairs(data.filter(lambda row: row["label"] == 0), seed=7)


def test_a_batch_of_pairs_scores_each_text_as_alone(tiny_llama: Path) -> None:
    cfg = from_run_config(
        {"model.name": str(tiny_llama), "model.task": "reward", "data.max-examples": 200, "data.test-size": 20}
    )
    bench = runtime.workbench(cfg)
    assert bench.model.config.num_labels == 1
    test = runtime.test_set(cfg).select(range(6))
    batch = next(iter(bench.loader(test, 6)))
    assert batch["input_ids"].shape[0] == 12 and "labels" not in batch
    bench.model.eval()
    with torch.no_grad():
        chosen, rejected = pair_rewards(bench.model, batch)
        alone = [
            bench.model(input_ids=torch.tensor([ids])).logits.item()
            for key in ("input_ids", "rejected_input_ids")
            for ids in test[key]
        ]
        torch.testing.assert_close(torch.cat([chosen, rejected]), torch.tensor(alone), atol=1e-5, rtol=1e-4)
        assert batch_loss(bench.model, batch).item() == pytest.approx(bradley_terry_loss(chosen, rejected).item())
    metrics = evaluate(bench.model, bench.loader(test, 4), "reward")
    assert metrics["num-examples"] == 6
    assert metrics["eval-accuracy"] == pairs_ranked_right(chosen, rejected) / 6
    assert metrics["eval-loss"] == pytest.approx(bradley_terry_loss(chosen, rejected).item(), rel=1e-5)


@pytest.mark.slow
def test_a_federated_reward_model_learns_to_rank_the_matching_answer(tmp_path: Path) -> None:
    """MiniLM (a real sentence encoder: a random tiny model cannot learn which answer fits) as a LoRA reward model."""
    overrides = {
        "model.name": "minilm",
        "model.task": "reward",
        "data.source": "chatterbot",
        "data.max-examples": 400,
        "data.test-size": 40,
        "num-server-rounds": 1,
        "train.local-steps": 6,
        "train.lr": 0.005,
        "train.lr-min": 0.0025,
        "train.max-length": 64,
    }
    overrides, rounds = simulate(tmp_path, overrides, clients=2, in_process=True)
    check_run(overrides, rounds, "eval-accuracy")
    accuracy = [entry["server-eval"]["eval-accuracy"] for entry in rounds]
    assert accuracy[-1] > accuracy[0] + 0.1, accuracy
