"""How a cohort travels: one Flower message to a worker node carries several virtual clients.

Instruction (server → worker), besides the usual ``config`` record:

* ConfigRecord ``cohort``: ``clients``, the virtual clients' ids (their
  partition ids), and ``adapter``, for each client the index ``i`` of the
  adapter it starts from;
* ArrayRecords ``arrays.<i>``: each distinct adapter once (clients of one rank
  and one task share one).

Reply (worker → server), per virtual client ``c``: MetricRecord ``metrics.<c>``,
for training also ArrayRecord ``arrays.<c>`` and, from AdaLoRA clients,
ConfigRecord ``rank-pattern.<c>``; a client that failed sends ConfigRecord
``error.<c>`` with its ``reason`` instead. :func:`split_reply` turns such a
reply back into one :class:`~flwr.app.RecordDict` per client, shaped like an
ordinary single-client reply, so the server validates and aggregates a virtual
client's update exactly like a node's.
"""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedlora.keys import ARRAYS, CONFIG

COHORT, ERROR = "cohort", "error"  # record names only cohort messages have


def is_cohort(content: RecordDict) -> bool:
    """Whether a message's content is a cohort instruction."""
    return COHORT in content.config_records


def instruction(
    config: ConfigRecord, clients: list[int], adapter_of: list[int], adapters: list[ArrayRecord]
) -> RecordDict:
    """A cohort instruction: ``clients[j]`` starts from ``adapters[adapter_of[j]]``."""
    content = RecordDict({CONFIG: config, COHORT: ConfigRecord({"clients": clients, "adapter": adapter_of})})
    for index, arrays in enumerate(adapters):
        content[f"{ARRAYS}.{index}"] = arrays
    return content


def read_instruction(content: RecordDict) -> list[tuple[int, ArrayRecord]]:
    """(client id, its adapter record) for each client of a cohort instruction; ``ValueError`` if malformed."""
    cohort = content.config_records[COHORT]
    clients, adapter_of = cohort.get("clients"), cohort.get("adapter")
    if not isinstance(clients, list) or not isinstance(adapter_of, list) or len(clients) != len(adapter_of):
        raise ValueError("cohort instruction needs equally long lists 'clients' and 'adapter'")
    try:
        return [(int(c), content.array_records[f"{ARRAYS}.{a}"]) for c, a in zip(clients, adapter_of, strict=True)]
    except KeyError as err:
        raise ValueError(f"cohort instruction lacks the adapter record {err}") from None


def reply(parts: Mapping[int, RecordDict | str]) -> RecordDict:
    """A cohort reply from each client's single-client reply content, or its failure reason."""
    content = RecordDict()
    for client, part in parts.items():
        if isinstance(part, str):
            content[f"{ERROR}.{client}"] = ConfigRecord({"reason": part})
            continue
        for key, record in part.items():
            content[f"{key}.{client}"] = record
    return content


def clients_in(content: RecordDict) -> set[int]:
    """The clients a cohort reply has records for."""
    return {int(suffix) for key in content for suffix in [key.rpartition(".")[2]] if suffix.isdigit()}


def split_reply(content: RecordDict, clients: list[int]) -> dict[int, RecordDict | str]:
    """Each of ``clients``' part of a cohort reply, as a single-client reply content, or why it has none.

    Records for clients not in ``clients`` are ignored: a worker answers only
    for the clients it was sent.
    """
    parts: dict[int, RecordDict | str] = {}
    for client in clients:
        suffix = f".{client}"
        if (error := content.config_records.get(ERROR + suffix)) is not None:
            parts[client] = f"client failed: {error.get('reason', '')}"
            continue
        part = RecordDict({key.removesuffix(suffix): record for key, record in content.items() if key.endswith(suffix)})
        parts[client] = part if len(part) else f"the cohort reply has nothing for client {client}"
    return parts
