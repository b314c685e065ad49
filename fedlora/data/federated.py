"""The federated split: a server-held test set, then one partition per client.

Every party computes the same split from the same seed, so in simulation no
data moves at all: the server takes ``test``; client ``i`` takes partition ``i``
of ``pool`` and splits it into its own train and validation sets. Partitioning
uses flwr-datasets' partitioners.
"""

from __future__ import annotations

from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner, Partitioner

from fedlora.config import ConfigError, DataSettings
from fedlora.data.sources import load_source
from fedlora.models import CAUSAL_LM


def server_and_pool(settings: DataSettings, seed: int, task: str = CAUSAL_LM) -> tuple[Dataset, Dataset]:
    """Load the source and hold out ``test-size`` examples: returns ``(test, pool)``.

    ``task`` decides which columns of your own data set are kept (the built-in sources have them all).
    """
    data = load_source(settings, task)
    if settings.max_examples and settings.max_examples < len(data):
        data = data.shuffle(seed=seed).select(range(settings.max_examples))
    if settings.test_size >= len(data):
        raise ValueError(f"data.test-size={settings.test_size} leaves nothing to train on ({len(data)} examples)")
    split = data.train_test_split(test_size=settings.test_size, seed=seed)
    return split["test"], split["train"]


def make_partitioner(settings: DataSettings, num_partitions: int, pool: Dataset, seed: int) -> Partitioner:
    """A flwr-datasets partitioner for ``data.partitioner``, already bound to ``pool``."""
    if settings.partitioner != "iid" and "label" not in pool.column_names:
        raise ConfigError(
            f"data.partitioner='{settings.partitioner}' splits by class, but data.source '{settings.source}' has no "
            f"data.label-column='{settings.label_column}'; name its label column or use data.partitioner='iid'"
        )
    if settings.partitioner == "iid":
        partitioner: Partitioner = IidPartitioner(num_partitions)  # shards of the (shuffled) pool
    elif settings.partitioner == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions,
            partition_by="label",
            alpha=settings.dirichlet_alpha,
            min_partition_size=min(10, len(pool) // (2 * num_partitions)),
            self_balancing=True,
            seed=seed,
        )
    else:
        # Natural: whole categories per client. With fewer clients than categories,
        # category c goes to group c mod num_partitions.
        num_categories = pool.features["label"].num_classes
        if num_partitions > num_categories:
            raise ValueError(
                f"data.partitioner='natural' needs at most {num_categories} clients for "
                f"'{settings.source}' (one category each at least), got {num_partitions}"
            )
        pool = pool.map(lambda row: {"group": row["label"] % num_partitions})
        partitioner = NaturalIdPartitioner(partition_by="group")
    partitioner.dataset = pool
    return partitioner


def partition_split(
    settings: DataSettings, partitioner: Partitioner, partition_id: int, seed: int
) -> tuple[Dataset, Dataset]:
    """Partition ``partition_id`` split into ``(train, validation)``; a clear error when it is (nearly) empty."""
    if not 0 <= partition_id < partitioner.num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside 0..{partitioner.num_partitions - 1}")
    partition = partitioner.load_partition(partition_id)
    if len(partition) < 2:
        raise ConfigError(
            f"client {partition_id}'s partition of data.source '{settings.source}' holds {len(partition)} "
            f"example(s) under data.partitioner='{settings.partitioner}' with {partitioner.num_partitions} clients; "
            "each needs 2 (train and validation): use fewer clients, more data or data.partitioner='iid'"
        )
    return local_split(partition, settings.val_fraction, seed)


def local_split(data: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """A node's own data split into ``(train, validation)``."""
    if len(data) < 2:
        raise ValueError(f"node data holds {len(data)} example(s); it needs at least 2 (train and validation)")
    split = data.train_test_split(test_size=val_fraction, seed=seed)
    return split["train"], split["test"]
