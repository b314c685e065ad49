"""SecAgg+ on Flower's Message API: the server's stages through the grid, and the client's answers.

The server runs one protocol per training round (:class:`SecureRound`), inside
the strategy's ``configure_train`` / ``aggregate_train``:

=====================  ==============================  =============================================
message type           server sends                    client answers
=====================  ==============================  =============================================
``query.secagg_keys``  the client's index              two X25519 public keys
``query.secagg_shares`` the neighbours' public keys     one encrypted share per neighbour, b's hash
``train.secagg``       the adapter + the shares for it the masked update (``uint64``), metrics
``query.secagg_unmask`` who is alive, who dropped       its shares of their seeds / mask keys
=====================  ==============================  =============================================

A client that fails or answers a malformed message at any stage counts as
dropped (logged with the reason, like an excluded reply); the protocol recovers
as long as enough share holders remain, else the round keeps the global adapter.
The maths is in :mod:`fedlora.privacy.secagg`; what a client keeps between its
stages lives in Flower's per-node ``context.state``.

Metrics (``num-examples``, ``train-loss``) stay in the clear, as with Flower's
own SecAgg+: the server learns each client's example count and loss, not its
adapter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from torch import Tensor

from fedlora.config import DPSettings, SecAggSettings
from fedlora.keys import (
    ARRAYS,
    MASKED,
    METRICS,
    NUM_EXAMPLES,
    SA_ALIVE,
    SA_CLIENTS,
    SA_COMMITMENT,
    SA_DROPPED,
    SA_ENCRYPTION_KEY,
    SA_GROUPS,
    SA_INDEX,
    SA_MASK_KEY,
    SA_PEERS,
    SA_REASONS,
    SA_REJECTED,
    SA_SHARES,
    SA_SIZES,
    SA_STATE,
    SA_THRESHOLD,
    SECAGG,
    SECAGG_KEYS,
    SECAGG_SHARES,
    SECAGG_TRAIN,
    SECAGG_UNMASK,
)
from fedlora.privacy import dp, secagg
from fedlora.privacy.secagg import ClientSecrets, ProtocolError, ServerSession

STAGES = ("keys", "shares", "train", "unmask")  # where secagg.simulate-dropout can make a client fail


def message_type(category: str, action: str) -> str:
    """Flower's ``<category>.<action>`` message type, routed to the client app's handler of that action."""
    return f"{category}.{action}"


def _record(entries: Mapping[str, Any]) -> ConfigRecord:
    """A ConfigRecord of ``entries`` without the empty lists (Flower cannot count their bytes)."""
    return ConfigRecord({k: v for k, v in entries.items() if not (isinstance(v, list) and not v)})


# --- server --------------------------------------------------------------------------------------------------------


class SecureRound:
    """One training round under SecAgg+, driven from the server through ``grid``.

    :meth:`open` runs the key and share stages and returns the training
    messages (stage 3); :meth:`close` takes the training replies, runs the
    unmask stage and returns the weighted mean update of the clients whose
    masked input counts. ``exclude(node, reason)`` is called for every client
    left out on the way; ``count(key, bytes)`` for the protocol's own bytes.
    """

    def __init__(
        self,
        settings: SecAggSettings,
        grid: Grid,
        server_round: int,
        exclude: Callable[[int, str], None],
        count: Callable[[str, int], None],
    ) -> None:
        self.settings, self.grid, self.server_round = settings, grid, server_round
        self.exclude, self.count = exclude, count
        self.node_of: dict[int, int] = {}  # index in the protocol (1..n, Shamir's x) -> Flower node id
        self.session: ServerSession | None = None
        self.planned = 0  # clients whose masked input the noise shares were sized for

    def open(self, messages: list[Message], sizes: Sequence[int], groups: Mapping[int, Sequence[int]]) -> list[Message]:
        """Stages 1 and 2 with the nodes of ``messages``; those messages, for the nodes still in, as stage 3's.

        ``sizes``: the length of each group's segment of a masked input;
        ``groups``: per node, the group of each tensor it was sent, in order
        (:func:`fedlora.privacy.secagg.lay_out`): one secure sum per group.
        """
        self.node_of = {i + 1: m.metadata.dst_node_id for i, m in enumerate(messages)}
        self.session = session = ServerSession(
            sorted(self.node_of), self.settings.num_shares, self.settings.dropout_fraction, self.server_round
        )
        self._exchange(
            SECAGG_KEYS,
            {i: {SA_INDEX: i} for i in self.node_of},
            lambda i, answer: session.add_keys(i, answer.get(SA_ENCRYPTION_KEY), answer.get(SA_MASK_KEY)),
        )
        requests = {
            i: {
                SA_THRESHOLD: session.threshold,
                SA_PEERS: list(peers),
                SA_ENCRYPTION_KEY: [e for e, _ in peers.values()],
                SA_MASK_KEY: [m for _, m in peers.values()],
            }
            for i, peers in session.share_requests().items()
        }
        self._exchange(SECAGG_SHARES, requests, lambda i, answer: session.add_shares(i, *_shares_of(answer)))
        forwards = session.forwards()
        if len(forwards) < session.threshold:
            log(WARNING, "round %d: secure aggregation: %d client(s) shared keys, fewer than the threshold %d; "
                "no training this round", self.server_round, len(forwards), session.threshold)  # fmt: skip
            return []
        self.planned = len(forwards)
        out = []
        for message in messages:
            index = self._index(message.metadata.dst_node_id)
            if index not in forwards:
                continue
            shares = forwards[index]
            node = message.metadata.dst_node_id
            instruction = _record({SA_INDEX: index, SA_PEERS: list(shares), SA_SHARES: list(shares.values()),
                                   SA_CLIENTS: len(forwards), SA_SIZES: list(sizes),
                                   SA_GROUPS: list(groups[node])})  # fmt: skip
            self.count("secagg-bytes-down", instruction.count_bytes())
            content = RecordDict({**dict(message.content.items()), SECAGG: instruction})
            out.append(Message(content=content, message_type=message_type(MessageType.TRAIN, SECAGG_TRAIN),
                               dst_node_id=node))  # fmt: skip
        return out

    def close(
        self, replies: Mapping[int, RecordDict], sizes: Sequence[int]
    ) -> tuple[list[np.ndarray | None], list[int], float]:
        """Per group, the mean update of its clients in the sum (None: none); those clients; the noise's share.

        ``replies``: node id -> training reply content, already checked for its
        metrics; ``sizes``: the groups' segment lengths, as given to :meth:`open`.
        Raises :class:`ProtocolError` when the sum cannot be recovered (too many
        dropouts, bad shares).
        """
        assert self.session is not None
        masked: dict[int, np.ndarray] = {}
        rejected: dict[int, dict[int, str]] = {}
        for node, content in replies.items():
            index = self._index(node)
            try:
                masked[index] = _masked_of(content, sum(sizes) + len(sizes))
                report = content.config_records.get(SECAGG, ConfigRecord())
                rejected[index] = dict(zip(report.get(SA_REJECTED, []), report.get(SA_REASONS, []), strict=True))
            except (ProtocolError, ValueError, TypeError) as err:
                self.exclude(node, f"secure aggregation: {err}")
        alive, dropped = self.session.unmask_request(masked, rejected)
        for index, reason in self.session.excluded.items():
            self.exclude(self.node_of[index], f"secure aggregation: {reason}")
        shares: dict[int, tuple[dict[int, bytes], dict[int, bytes]]] = {}

        def reveal(index: int, answer: ConfigRecord) -> None:
            seeds = _pairs(answer, SA_ALIVE, SA_SHARES)
            keys = _pairs(answer, SA_DROPPED, SA_MASK_KEY)
            shares[index] = (seeds, keys)

        self._exchange(SECAGG_UNMASK, {i: {SA_ALIVE: alive, SA_DROPPED: dropped} for i in alive}, reveal)
        total = self.session.unmask(masked, shares)
        decoded = secagg.decode_groups(total, sizes, self.settings.clip_range, self.settings.quantization_range)
        log(INFO, "round %d: secure aggregation of %d client(s) (%d dropped or excluded), weight per group %s",
            self.server_round, len(alive), len(dropped), [w for _, w in decoded])  # fmt: skip
        return [mean for mean, _ in decoded], [self.node_of[i] for i in alive], len(alive) / max(self.planned, 1)

    def _index(self, node: int) -> int:
        return next(i for i, n in self.node_of.items() if n == node)

    def _exchange(
        self, action: str, instructions: Mapping[int, Mapping[str, Any]], handle: Callable[[int, ConfigRecord], None]
    ) -> None:
        """One query stage: each instruction to its client; each answer to ``handle``; failures excluded."""
        messages = []
        for index, entries in instructions.items():
            record = _record(entries)
            self.count("secagg-bytes-down", record.count_bytes())
            messages.append(
                Message(
                    content=RecordDict({SECAGG: record}),
                    message_type=message_type(MessageType.QUERY, action),
                    dst_node_id=self.node_of[index],
                )
            )
        answered = set()
        for reply in self.grid.send_and_receive(messages):
            node = reply.metadata.src_node_id
            index = self._index(node)
            answered.add(index)
            try:
                if reply.has_error():
                    raise ProtocolError(f"client failed: {reply.error.reason}")
                answer = reply.content.config_records.get(SECAGG)
                if answer is None:
                    raise ProtocolError(f"no ConfigRecord '{SECAGG}' in the answer")
                self.count("secagg-bytes-up", answer.count_bytes())
                handle(index, answer)
            except (ProtocolError, ValueError, TypeError) as err:
                self._drop(node, action, str(err))
        for index in set(instructions) - answered:
            self._drop(self.node_of[index], action, "no answer")

    def _drop(self, node: int, action: str, reason: str) -> None:
        """A client that failed a stage: excluded, unless its masked input is in already (the unmask stage)."""
        if action != SECAGG_UNMASK:
            self.exclude(node, f"secure aggregation, stage {action}: {reason}")
            return
        log(WARNING, "round %d: node %d dropped out after its masked input (which still counts): %s",
            self.server_round, node, reason)  # fmt: skip
        self.count("secagg-late-dropouts", 1)


def _pairs(answer: ConfigRecord, ids: str, values: str) -> dict[int, bytes]:
    keys, items = answer.get(ids, []), answer.get(values, [])
    if len(keys) != len(items):
        raise ProtocolError(f"'{ids}' and '{values}' differ in length")
    return dict(zip(keys, items, strict=True))


def _shares_of(answer: ConfigRecord) -> tuple[dict[int, bytes], object]:
    return _pairs(answer, SA_PEERS, SA_SHARES), answer.get(SA_COMMITMENT)


def _masked_of(content: RecordDict, length: int) -> np.ndarray:
    """The masked input of a training reply: one ``uint64`` array of ``length`` values."""
    record = content[ARRAYS]
    if list(record) != [MASKED]:
        raise ProtocolError(f"expected one array '{MASKED}', got {list(record)}")
    vector = record[MASKED].numpy()
    if vector.dtype != np.uint64 or vector.shape != (length,):
        raise ProtocolError(f"masked input is {vector.dtype} {vector.shape}, expected uint64 ({length},)")
    return vector


# --- client --------------------------------------------------------------------------------------------------------


def simulate_dropout(settings: SecAggSettings, partition_id: int, stage: str) -> None:
    """Fail here if ``secagg.simulate-dropout`` names this client at this stage (testing dropout recovery)."""
    for item in filter(None, (p.strip() for p in settings.simulate_dropout.split(","))):
        name, _, client = item.partition(":")
        if name not in STAGES or not client.isdigit():
            raise ValueError(f"secagg.simulate-dropout: '{item}' is not <stage>:<partition-id>, stage in {STAGES}")
        if name == stage and int(client) == partition_id:
            raise RuntimeError(f"simulated dropout of client {partition_id} at stage '{stage}'")


def _secrets(state: RecordDict) -> ClientSecrets:
    try:
        return ClientSecrets.from_bytes(state.config_records[SECAGG][SA_STATE])  # type: ignore[arg-type]
    except KeyError:
        raise ProtocolError("no secure-aggregation state on this client: an earlier stage did not run here") from None


def _keep(state: RecordDict, secrets: ClientSecrets) -> None:
    state[SECAGG] = ConfigRecord({SA_STATE: secrets.to_bytes()})


def answer_keys(content: RecordDict, state: RecordDict) -> RecordDict:
    """Stage 1: fresh key pairs; the public keys."""
    secrets, encryption_public, mask_public = secagg.client_keys(int(content[SECAGG][SA_INDEX]))
    _keep(state, secrets)
    return RecordDict({SECAGG: ConfigRecord({SA_ENCRYPTION_KEY: encryption_public, SA_MASK_KEY: mask_public})})


def answer_shares(content: RecordDict, state: RecordDict) -> RecordDict:
    """Stage 2: shares of this client's seed and mask key, encrypted for each neighbour; the seed's hash."""
    instruction, secrets = content[SECAGG], _secrets(state)
    peers = dict(
        zip(
            instruction[SA_PEERS],
            zip(instruction[SA_ENCRYPTION_KEY], instruction[SA_MASK_KEY], strict=True),
            strict=True,
        )
    )
    ciphertexts, commitment = secagg.client_shares(secrets, peers, int(instruction[SA_THRESHOLD]))
    _keep(state, secrets)
    answer = {SA_PEERS: list(ciphertexts), SA_SHARES: list(ciphertexts.values()), SA_COMMITMENT: commitment}
    return RecordDict({SECAGG: _record(answer)})


def masked_reply(
    content: RecordDict,
    reply: RecordDict,
    sent: Mapping[str, Tensor],
    trained: Mapping[str, Tensor],
    state: RecordDict,
    settings: SecAggSettings,
    privacy: DPSettings,
) -> RecordDict:
    """Stage 3: the training ``reply`` with its adapter replaced by the masked (clipped, noised) weighted update.

    The update is spread over the groups' segments the instruction describes
    (:func:`fedlora.privacy.secagg.lay_out`): this client's tensors in its own
    groups, zeros with weight 0 in the others.

    Under DP the weight is 1 and each of the ``n`` clients adds noise of
    standard deviation ``σ·C/√n``: the sum carries ``N(0, (σ·C)²)``, as if the
    server had added it, but no one ever sees a less noisy value.
    """
    instruction, secrets = content[SECAGG], _secrets(state)
    rejected = secagg.client_receive(secrets, dict(zip(instruction[SA_PEERS], instruction[SA_SHARES], strict=True)))
    for sender, reason in rejected.items():
        log(WARNING, "secure aggregation: client %d's share rejected: %s", sender, reason)
    update = dp.flatten_update(trained, sent)
    weight = int(reply[METRICS][NUM_EXAMPLES])
    sizes = [int(size) for size in instruction[SA_SIZES]]
    if privacy.clip_norm:
        clients = int(instruction[SA_CLIENTS])
        update = dp.clip(update, privacy.clip_norm) + dp.gaussian(
            update.size, privacy.noise_multiplier * privacy.clip_norm / math.sqrt(clients)
        )
        weight = 1
    if (clipped := int(np.sum(np.abs(update) > settings.clip_range))) > 0:
        log(WARNING, "secure aggregation: %d update value(s) beyond secagg.clip-range=%g are clipped",
            clipped, settings.clip_range)  # fmt: skip
    lengths = [t.numel() for t in sent.values()]
    spread, weights = secagg.lay_out(update, lengths, [int(g) for g in instruction[SA_GROUPS]], sizes, weight)
    vector = secagg.client_mask(secrets, spread, weights, settings.clip_range, settings.quantization_range, sizes)
    _keep(state, secrets)
    out = RecordDict({ARRAYS: ArrayRecord({MASKED: Array(vector)}), METRICS: reply[METRICS]})
    out[SECAGG] = _record({SA_REJECTED: list(rejected), SA_REASONS: list(rejected.values())})
    return out


def answer_unmask(content: RecordDict, state: RecordDict) -> RecordDict:
    """Stage 4: this client's shares of the alive clients' seeds and the dropped clients' mask keys."""
    instruction = content[SECAGG]
    seeds, keys = secagg.client_unmask(_secrets(state), instruction.get(SA_ALIVE, []), instruction.get(SA_DROPPED, []))
    del state[SECAGG]  # the round is over: its secrets are not needed again
    answer = {SA_ALIVE: list(seeds), SA_SHARES: list(seeds.values()), SA_DROPPED: list(keys),
              SA_MASK_KEY: list(keys.values())}  # fmt: skip
    return RecordDict({SECAGG: _record(answer)})
