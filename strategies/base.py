"""The base every fedlora strategy builds on.

:class:`AdapterStrategy` is Flower's ``FedAvg`` (sampling, message building,
metric aggregation) plus what adapters need:

* every training reply is checked against the global adapter that was sent,
  by its byte count before it is decoded, then its keys, shapes, dtype, values
  finite in the wire dtype, an integer ``num-examples`` and a bound on the
  update's norm; a bad reply, or one whose decoding fails in any way, is
  excluded with a logged reason naming the node, and the round goes on with the
  rest; with fewer than ``min_replies`` good replies the global adapter stays as
  it was, and so it does when the strategy's aggregation itself fails;
* no client's weight exceeds ``max_weight_ratio`` times the round's median, and
  ``robust`` bounds a minority of bad clients for every strategy
  (:mod:`fedlora.robust`); only finite scalar metrics are averaged
  (:func:`fedlora.robust.average_metrics`, in place of Flower's
  ``train_metrics_aggr_fn`` / ``evaluate_metrics_aggr_fn``);
* rounds can start after 1 (``round_offset``), so a resumed run numbers them,
  and tells clients, as the interrupted run would have;
* bytes sent and received are counted per round;
* with ``strategy.server-optimizer``, the aggregate is not taken as it is: the
  server steps from the global adapter along ``aggregate − global`` with its
  own optimiser (:mod:`fedlora.server_opt`), on the tensors
  :meth:`AdapterStrategy.server_keys` names; a strategy whose aggregate is not
  such a step refuses it (:meth:`AdapterStrategy.server_optimizer_refusal`);
* the new global adapter is rounded to the transport dtype, so the server's
  evaluation, the clients and the saved adapter all see the same numbers.

A strategy composes an :class:`fedlora.aggregators.Aggregator` (its
``aggregator``: the pure maths from the accepted clients' states and weights to
the new global state, with per-round diagnostics for the log), or overrides
:meth:`AdapterStrategy.aggregate_states` for maths of its own. A strategy that
sends nodes different adapters (clients of different LoRA ranks, of different
tasks) sets ``per_node = True`` and implements
:meth:`AdapterStrategy.client_state`, the adapter for a node's
:class:`NodeProfile`: the base then asks each node its profile once (a Flower
``query`` message answered by the client app from its node config) and sends
every node its own adapter. Replies are checked against what that node was
sent, so a reply of the wrong rank or task is excluded like any other
malformed one. docs/strategies.md walks through writing a strategy.

With :class:`Cohorts` (``cohort.clients`` set), the clients are *virtual*:
each round samples them, packs them into cohorts and sends each cohort to a
worker node in one message (:mod:`fedlora.cohort.protocol`). The reply is cut
back into one :class:`ClientReply` per virtual client, and from there on a
virtual client's update is validated, counted and aggregated exactly like a
node's; a strategy never sees the difference.

With secure aggregation (``secagg.enabled``) or client-level differential
privacy (``dp.clip-norm``) the server aggregates only a sum of updates
(:mod:`fedlora.privacy`): a strategy allows it when its aggregate is a weighted
sum of the clients' tensors (:meth:`AdapterStrategy.sum_refusal`), and then
aggregates the one mean state it is given. Tensors shared by different sets of
clients (MTLoRA's tasks) are summed per group (:meth:`AdapterStrategy.sum_groups`).

From ``FedAvg`` only the public ``configure_train`` / ``configure_evaluate``
are used: their sampled messages are rebuilt per node (its own adapter, what it
was sent remembered), so no private Flower method is overridden.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from logging import ERROR, INFO, WARNING
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from torch import Tensor

from fedlora.aggregators import NOT_A_MEAN, AggregateResult, Aggregator
from fedlora.cohort import protocol
from fedlora.config import ConfigError, DPSettings, RunConfig, RunSettings, SecAggSettings, StrategySettings
from fedlora.keys import (
    ARRAYS,
    CONFIG,
    NUM_EXAMPLES,
    PROFILE_QUESTION,
    RANK_KEY,
    SERVER_ROUND,
    TASK_KEY,
    base_part,
    is_lora_a,
    trained_part,
)
from fedlora.privacy import dp
from fedlora.privacy.rounds import SecureRound
from fedlora.privacy.secagg import ProtocolError
from fedlora.robust import average_metrics, capped_weights, robust_states, update_norm
from fedlora.server_opt import Moments, ServerOptimizer, server_step
from fedlora.validation import InvalidUpdate, check_record_size, check_state, check_weight
from fedlora.wire import from_record, record_nbytes, to_record


@dataclass(frozen=True)
class NodeProfile:
    """What a node told the server about itself: its LoRA rank and its task ("" when the run has no tasks)."""

    rank: int
    task: str = ""


@dataclass(frozen=True)
class Cohorts:
    """Virtual clients decoupled from the Flower nodes, which become workers (``cohort.*`` run-config keys)."""

    clients: int  # virtual clients in the federation, ids 0..clients-1 (their partition ids)
    size: int  # most clients per message
    profile: Callable[[int], NodeProfile]  # a virtual client's rank and task, from the run config


@dataclass
class ClientReply:
    """One client's answer: a node's reply, or one virtual client's part of a cohort reply."""

    client: int  # the node id; with cohorts, the virtual client's id
    content: RecordDict | None  # None when the client failed
    error: str = ""


class AdapterStrategy(FedAvg):
    """FedAvg's orchestration with validated, byte-counted adapter aggregation.

    Parameters are Flower ``FedAvg``'s, plus ``wire_dtype`` (``float32`` or
    ``float16``), the dtype the global adapter is sent in; ``min_replies``, the
    fewest good replies a round aggregates; ``max_update_norm``, the largest
    accepted L2 norm of a reply's update (0: no bound); ``max_weight_ratio``, the
    largest weight of a client relative to the round's median; ``robust`` and
    ``trim_fraction``, the robust aggregation (:func:`fedlora.robust.robust_states`);
    ``server_optimizer``, the server's step on the aggregate (None: the aggregate as is).
    ``secagg`` and ``privacy``, secure aggregation and differential privacy
    (None: off). ``aggregator``, the maths (None: the class's ``aggregator``
    attribute; a strategy overriding :meth:`aggregate_states` needs none).
    Defaults are the run config's.
    """

    per_node: ClassVar[bool] = False  # True: ask nodes their profile and send each its own adapter
    aggregator: Aggregator  # the maths: a class attribute or the constructor's, unless aggregate_states is overridden

    def __init__(
        self,
        *,
        wire_dtype: str = "float32",
        min_replies: int = 1,
        max_update_norm: float = RunSettings.max_update_norm,
        max_weight_ratio: float = RunSettings.max_weight_ratio,
        robust: str = StrategySettings.robust,
        trim_fraction: float = StrategySettings.trim_fraction,
        cohorts: Cohorts | None = None,
        server_optimizer: ServerOptimizer | None = None,
        secagg: SecAggSettings | None = None,
        privacy: DPSettings | None = None,
        aggregator: Aggregator | None = None,
        **fedavg_kwargs: Any,
    ) -> None:
        # Flower's defaults, named explicitly: the client app reads the same keys (fedlora.keys)
        super().__init__(arrayrecord_key=ARRAYS, configrecord_key=CONFIG, weighted_by_key=NUM_EXAMPLES, **fedavg_kwargs)
        if aggregator is not None:
            self.aggregator = aggregator
        if not hasattr(self, "aggregator") and type(self).aggregate_states is AdapterStrategy.aggregate_states:
            raise TypeError(f"{type(self).__name__} sets no aggregator and overrides no aggregate_states")
        self.cohorts = cohorts
        self.assigned: dict[int, int] = {}  # with cohorts: virtual client -> the worker node it was sent to
        self.wire_dtype = wire_dtype
        self.min_replies = min_replies
        self.max_update_norm = max_update_norm
        self.max_weight_ratio = max_weight_ratio
        self.robust = robust
        self.trim_fraction = trim_fraction
        self.server_optimizer = server_optimizer
        self.moments = Moments()  # the server optimiser's state (not checkpointed: a resumed run restarts it)
        self.secagg, self.privacy = secagg, privacy
        self.secure: SecureRound | None = None  # this round's secure aggregation
        self.round_offset = 0  # rounds already done by an earlier, interrupted run
        self.global_state: dict[str, Tensor] = {}
        self.current_round = 0  # the round being trained, as clients are told (round_offset included)
        self.profiles: dict[int, NodeProfile] = {}  # answers to the profile query, kept for the whole run
        self.sent: dict[int, dict[str, Tensor]] = {}  # per client, what it was sent to train: replies must match
        self._grid: Grid | None = None
        # Per round: bytes, exclusions, aggregated metrics and whatever a subclass
        # records; JSON-serialisable, written to metrics.json by the server app.
        self.round_log: dict[int, dict[str, Any]] = defaultdict(dict)

    @classmethod
    def options(cls, cfg: RunConfig) -> dict[str, Any]:
        """Constructor arguments this strategy takes from the run config (default: none)."""
        return {}

    @classmethod
    def server_optimizer_refusal(cls, cfg: RunConfig) -> str:
        """Why ``strategy.server-optimizer`` makes no sense for this strategy ("" when it does: the default)."""
        return ""

    def server_keys(self) -> list[str]:
        """The tensors the server optimiser steps (default: every tensor the clients train, not base tensors)."""
        return list(trained_part(self.global_state))

    @classmethod
    def sum_refusal(cls, cfg: RunConfig) -> str:
        """Why this strategy cannot aggregate from a sum of updates (secure aggregation, DP); "" if it can.

        It can when its aggregate of any states is their weighted mean
        (its aggregator's ``sum_refusal`` is empty), so the mean alone (all the
        server learns) gives the same adapter. Default: no.
        """
        return NOT_A_MEAN

    @classmethod
    def noise_refusal(cls, cfg: RunConfig) -> str:
        """Why client-level DP does not apply though a sum does ("" when it does: the default)."""
        return ""

    def sum_groups(self) -> list[list[str]]:
        """The tensors a secure (or DP) sum adds up, in groups each summed over the clients sent it, in order.

        Default: one group, every tensor the clients are sent to train (base
        tensors, such as FLoRA's residual, are the server's own and never come back).
        """
        return [list(trained_part(self.global_state))]

    def aggregate_states(
        self, server_round: int, states: list[dict[str, Tensor]], weights: list[float]
    ) -> dict[str, Tensor]:
        """New global adapter state from the accepted clients' states (float32) and weights.

        Default: :attr:`aggregator` on the global adapter, its diagnostics recorded (:meth:`record`).
        """
        return self.record(server_round, self.aggregator.aggregate(self.global_state, states, weights))

    def record(self, server_round: int, result: AggregateResult) -> dict[str, Tensor]:
        """``result``'s state; its diagnostics go to the round's log, the scalar ones also to the server's log."""
        self.round_log[server_round].update(result.diagnostics)
        if scalars := {k: v for k, v in result.diagnostics.items() if isinstance(v, int | float)}:
            log(INFO, "round %d: %s", server_round, ", ".join(f"{k} {v:.4g}" for k, v in scalars.items()))
        return result.state

    def client_state(self, profile: NodeProfile) -> dict[str, Tensor]:
        """The adapter sent to a node with ``profile`` (default: the global adapter itself)."""
        return self.global_state

    def message_state(self) -> dict[str, Tensor]:
        """What every node is sent this round when all get the same (default: the global adapter itself).

        A strategy that sends part of its global state overrides it (LISA: the round's layers).
        """
        return self.global_state

    def check_profile(self, profile: NodeProfile) -> None:
        """Raise :class:`InvalidUpdate` if this strategy cannot serve a node with ``profile`` (default: rank check)."""
        if not 1 <= profile.rank <= self.global_rank:
            raise InvalidUpdate(f"'{RANK_KEY}' must be an integer in 1..{self.global_rank}, got {profile.rank}")

    @property
    def global_rank(self) -> int:
        """The largest rank of the global adapter's LoRA layers (0 without any)."""
        return max((t.shape[0] for k, t in self.global_state.items() if is_lora_a(k)), default=0)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's sampling, one message per node; remembers what each node was sent, to check its reply."""
        server_round += self.round_offset
        self.global_state, self._grid, self.sent, self.current_round = from_record(arrays), grid, {}, server_round
        if self.cohorts:
            messages = self._cohort_messages(arrays, config, MessageType.TRAIN, self.fraction_train, server_round)
            sampled = len(self.sent)
        else:
            sampled_by_fedavg = super().configure_train(server_round, arrays, config, grid)
            messages = self._per_client(sampled_by_fedavg, arrays, config, MessageType.TRAIN)
            sampled = len(messages)
            if self.secagg and (groups := self.sum_groups()):
                exclude, count = partial(self._exclude_client, server_round), partial(self._count, server_round)
                self.secure = SecureRound(self.secagg, grid, server_round, exclude, count)
                messages = self.secure.open(list(messages), *self._layout(groups))
        messages = self._count_down(server_round, messages)
        if sampled < self.min_replies:  # no round of this run could ever aggregate
            raise ConfigError(
                f"min-replies={self.min_replies} but only {sampled} client(s) can be sampled for training "
                f"(fraction-train={self.fraction_train}, {len(list(grid.get_node_ids()))} node(s) connected)"
            )
        return messages

    def _layout(self, groups: list[list[str]]) -> tuple[list[int], dict[int, list[int]]]:
        """The groups' segment lengths, and per node the group of each tensor it was sent (in order)."""
        group_of = {key: index for index, keys in enumerate(groups) for key in keys}
        sizes = [sum(self.global_state[k].numel() for k in keys) for keys in groups]
        return sizes, {node: [group_of[k] for k in sent] for node, sent in self.sent.items()}

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's evaluation sampling, one message per node, with bytes counted."""
        server_round += self.round_offset
        self.global_state, self._grid = from_record(arrays), grid
        if self.cohorts:
            messages = self._cohort_messages(arrays, config, MessageType.EVALUATE, self.fraction_evaluate, server_round)
        else:
            sampled_by_fedavg = super().configure_evaluate(server_round, arrays, config, grid)
            messages = self._per_client(sampled_by_fedavg, arrays, config, MessageType.EVALUATE)
        return self._count_down(server_round, messages)

    def _encoder(self, arrays: ArrayRecord) -> Callable[[NodeProfile | None], tuple[dict[str, Tensor], ArrayRecord]]:
        """What a client of a profile is sent: (its trainable tensors, the record), encoded once per profile."""
        encoded: dict[NodeProfile | None, tuple[dict[str, Tensor], ArrayRecord]] = {}

        def encode(profile: NodeProfile | None) -> tuple[dict[str, Tensor], ArrayRecord]:
            if profile not in encoded:
                state = self.client_state(profile) if profile else self.message_state()
                record = arrays if state is self.global_state else to_record(state, self.wire_dtype)
                encoded[profile] = (trained_part(state), record)
            return encoded[profile]

        return encode

    def _cohort_messages(
        self, arrays: ArrayRecord, config: ConfigRecord, message_type: str, fraction: float, server_round: int
    ) -> list[Message]:
        """Sample ``fraction`` of the virtual clients, pack them into cohorts, one message per cohort to a worker."""
        assert self.cohorts is not None and self._grid is not None
        if fraction == 0.0:
            return []
        total = self.cohorts.clients
        clients = sorted(random.sample(range(total), min(total, max(self.min_train_nodes, int(total * fraction)))))
        if self.per_node:
            clients = self._with_virtual_profile(clients)
        workers = sorted(sample_nodes(self._grid, 1, 0)[1])  # waits for the first worker to connect
        config[SERVER_ROUND] = server_round
        encode = self._encoder(arrays)
        self.assigned, messages = {}, []
        for number, first in enumerate(range(0, len(clients), self.cohorts.size)):
            cohort = clients[first : first + self.cohorts.size]
            worker = workers[number % len(workers)]
            records: list[ArrayRecord] = []
            index: dict[NodeProfile | None, int] = {}  # profile -> its adapter's index in this message
            adapter_of = []
            for client in cohort:
                profile = self.profiles[client] if self.per_node else None
                expected, record = encode(profile)
                if profile not in index:
                    index[profile] = len(records)
                    records.append(record)
                adapter_of.append(index[profile])
                self.assigned[client] = worker
                if message_type == MessageType.TRAIN:
                    self.sent[client] = expected
            content = protocol.instruction(config, cohort, adapter_of, records)
            messages.append(Message(content=content, message_type=message_type, dst_node_id=worker))
        log(INFO, "%s: %d virtual clients in %d cohort(s) on %d worker(s)", message_type, len(clients),
            len(messages), len(workers))  # fmt: skip
        return messages

    def _with_virtual_profile(self, clients: list[int]) -> list[int]:
        """The virtual clients this strategy can serve, their profiles (from the run config) remembered."""
        assert self.cohorts is not None
        served = []
        for client in clients:
            profile = self.profiles.get(client) or self.cohorts.profile(client)
            try:
                self.check_profile(profile)
            except InvalidUpdate as err:
                log(WARNING, "virtual client %d left out: %s", client, err)
                continue
            self.profiles[client] = profile
            served.append(client)
        return served

    def _per_client(
        self, sampled: Iterable[Message], arrays: ArrayRecord, config: ConfigRecord, message_type: str
    ) -> list[Message]:
        """FedAvg's sampled messages rebuilt per node: :meth:`client_state` for its profile; remembers what it was sent.

        FedAvg sends every sampled node the same record; only its sampling is
        kept (the nodes its messages go to), so no private Flower method is overridden.
        """
        node_ids = [m.metadata.dst_node_id for m in sampled]
        if self.per_node:
            node_ids = self._with_profile(node_ids)
        encode = self._encoder(arrays)
        messages = []
        for node_id in node_ids:
            expected, node_arrays = encode(self.profiles[node_id] if self.per_node else None)
            content = RecordDict({self.arrayrecord_key: node_arrays, self.configrecord_key: config})
            messages.append(Message(content=content, message_type=message_type, dst_node_id=node_id))
            if message_type == MessageType.TRAIN:
                self.sent[node_id] = expected
        return messages

    def _with_profile(self, node_ids: list[int]) -> list[int]:
        """Ask the nodes whose profile is unknown (once per node); drop those this strategy cannot serve."""
        unknown = [n for n in node_ids if n not in self.profiles]
        if unknown and self._grid is not None:
            query = RecordDict({self.configrecord_key: ConfigRecord({PROFILE_QUESTION: [RANK_KEY, TASK_KEY]})})
            asks = [Message(content=query, message_type=MessageType.QUERY, dst_node_id=n) for n in unknown]
            for reply in self._grid.send_and_receive(asks):
                node = reply.metadata.src_node_id
                try:
                    self.profiles[node] = self._profile(reply)
                except InvalidUpdate as err:
                    log(WARNING, "node %d left out: %s", node, err)
        return [n for n in node_ids if n in self.profiles]

    def _profile(self, reply: Message) -> NodeProfile:
        if reply.has_error():
            raise InvalidUpdate(f"profile query failed: {reply.error.reason}")
        answer = next(iter(reply.content.config_records.values()), {})
        rank, task = answer.get(RANK_KEY), answer.get(TASK_KEY, "")
        if isinstance(rank, bool) or not isinstance(rank, int) or not isinstance(task, str):
            raise InvalidUpdate(
                f"profile must hold an integer '{RANK_KEY}' and a text '{TASK_KEY}', got {dict(answer)}"
            )
        profile = NodeProfile(rank, task)
        self.check_profile(profile)
        return profile

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check each reply, aggregate the good ones, keep the global adapter if too few are good."""
        server_round += self.round_offset
        if (self.secagg or (self.privacy and self.privacy.clip_norm)) and self.sum_groups():
            return self._aggregate_mean(server_round, self.client_replies(replies))
        accepted: list[ClientReply] = []
        states, weights, sents = [], [], []
        for reply in self.client_replies(replies):
            try:
                state, weight = self.decode_reply(reply)
            except InvalidUpdate as err:
                self._exclude(server_round, reply, str(err))
                continue
            except Exception as err:  # a reply is data: whatever it holds, it must not stop the round
                self._exclude(server_round, reply, f"cannot be decoded ({type(err).__name__}: {err})")
                continue
            self._count(server_round, "bytes-up", record_nbytes(reply.content[self.arrayrecord_key]))
            accepted.append(reply)
            states.append(state)
            weights.append(weight)
            sents.append(self.sent[reply.client])
        log(INFO, "aggregate_train: %d reply(ies) accepted", len(accepted))
        if len(accepted) < self.min_replies:
            log(
                WARNING,
                "round %d: %d valid reply(ies), fewer than min-replies=%d; the global adapter stays as it was",
                server_round,
                len(accepted),
                self.min_replies,
            )
            return None, None
        weights = capped_weights(weights, self.max_weight_ratio)
        try:
            robust = robust_states(states, sents, self.robust, self.trim_fraction)
            new_state, moments = self._server_step(self.aggregate_states(server_round, robust, weights))
            arrays = to_record(new_state, self.wire_dtype)
            self._check_global(from_record(arrays))  # as it travels: a float16 wire turns 1e5 into inf
            self.moments = moments  # kept only with the adapter they produced
        except Exception as err:  # a strategy bug or numeric failure must not ship a broken adapter nor stop the run
            log(ERROR, "round %d: aggregation failed, the global adapter stays as it was: %r", server_round, err)
            self._count(server_round, "failed-aggregations", 1)
            return None, None
        return arrays, self._train_metrics(server_round, accepted, weights)

    def _server_step(self, new_state: dict[str, Tensor]) -> tuple[dict[str, Tensor], Moments]:
        """The server optimiser's step from the global adapter towards ``new_state`` (none: ``new_state``)."""
        if not self.server_optimizer:
            return new_state, self.moments
        return server_step(self.server_optimizer, self.moments, self.global_state, new_state, self.server_keys())

    def _aggregate_mean(
        self, server_round: int, replies: list[ClientReply]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Secure aggregation and/or DP: the new adapter from the (noisy) mean update alone.

        Metrics are checked and averaged in the clear. Under secure aggregation
        the mean comes from the protocol, one per group of :meth:`sum_groups`
        (a group with fewer than ``min_replies`` clients in its sum, or none,
        keeps its tensors as they were); else from the decoded replies, clipped
        and noised here (:func:`fedlora.privacy.dp.noisy_mean`, one group only).
        """
        good: dict[int, ClientReply] = {}
        weights: dict[int, float] = {}
        for reply in replies:
            try:
                weights[reply.client] = self._weight(reply, expect_arrays=True)
            except InvalidUpdate as err:
                self._exclude(server_round, reply, str(err))
                continue
            good[reply.client] = reply
        groups = self.sum_groups()
        templates = [{k: self.global_state[k] for k in keys} for keys in groups]  # what each group was sent
        try:
            if self.secure:
                contents = {c: r.content for c, r in good.items() if r.content is not None}
                sizes, layout = self._layout(groups)
                means, included, noise_share = self.secure.close(contents, sizes)
                self._count(server_round, "bytes-up", sum(record_nbytes(contents[c][self.arrayrecord_key])
                                                          for c in included))  # fmt: skip
                for group, keys in enumerate(groups):
                    if 0 < (members := sum(group in layout[c] for c in included)) < self.min_replies:
                        log(WARNING, "round %d: %d client(s) in the sum of '%s' and its group, fewer than "
                            "min-replies=%d: they stay as they were", server_round, members, keys[0],
                            self.min_replies)  # fmt: skip
                        means[group] = None
            else:
                if len(templates) != 1:
                    raise ProtocolError(f"differential privacy without secure aggregation sums one group, not "
                                        f"{len(templates)}")  # fmt: skip
                sent = templates[0]
                updates = {}
                for client, reply in good.items():
                    try:
                        updates[client] = dp.flatten_update(self.decode_reply(reply)[0], sent)
                    except InvalidUpdate as err:
                        self._exclude(server_round, reply, str(err))
                        continue
                    self._count(server_round, "bytes-up", record_nbytes(reply.content[self.arrayrecord_key]))
                included, noise_share = list(updates), 1.0
                if not updates:
                    raise ProtocolError("no valid reply")
                assert self.privacy is not None
                means = [dp.noisy_mean(list(updates.values()), self.privacy.clip_norm, self.privacy.noise_multiplier)]
            if len(included) < self.min_replies:
                raise ProtocolError(f"{len(included)} client(s) in the sum, fewer than min-replies={self.min_replies}")
            mean_state = {}  # every group's mean state: a group without one keeps its tensors (the aggregators' rule)
            for template, mean in zip(templates, means, strict=True):
                if mean is not None:
                    mean_state.update(dp.add_update(template, mean))
            state, moments = self._server_step(self.aggregate_states(server_round, [mean_state], [1.0]))
            arrays = to_record(state, self.wire_dtype)
            self._check_global(from_record(arrays))
            self.moments = moments
        except Exception as err:  # a failed protocol or aggregation must not ship a broken adapter nor stop the run
            log(ERROR, "round %d: aggregation failed, the global adapter stays as it was: %s", server_round, err)
            self._count(server_round, "failed-aggregations", 1)
            return None, None
        if self.privacy and self.privacy.clip_norm:
            self._account(server_round, self.privacy, noise_share)
        accepted = [good[c] for c in included]
        return arrays, self._train_metrics(server_round, accepted, [weights[c] for c in included])

    def _account(self, server_round: int, privacy: DPSettings, noise_share: float) -> None:
        """Record this round's noise multiplier and sampling rate, and ε after it (over every round so far)."""
        entry = self.round_log[server_round]
        connected = len(list(self._grid.get_node_ids())) if self._grid else len(self.sent)
        # under secure aggregation each client adds a 1/n share of the noise: dropouts leave less of it
        entry["dp-noise-multiplier"] = privacy.noise_multiplier * noise_share**0.5
        entry["dp-sample-rate"] = min(1.0, len(self.sent) / max(connected, 1))
        history = [(e["dp-noise-multiplier"], e["dp-sample-rate"]) for r, e in sorted(self.round_log.items())
                   if r <= server_round and "dp-noise-multiplier" in e]  # fmt: skip
        entry["dp-epsilon"] = dp.epsilon(history, privacy.delta)
        entry["dp-delta"] = privacy.delta
        log(INFO, "round %d: differential privacy (epsilon, delta) = (%.4g, %g) after %d round(s)", server_round,
            entry["dp-epsilon"], privacy.delta, len(history))  # fmt: skip

    def _train_metrics(self, server_round: int, accepted: list[ClientReply], weights: list[float]) -> MetricRecord:
        """The accepted replies' averaged metrics, plus the round's numeric log entries (bytes, exclusions)."""
        metrics = MetricRecord(self._average_metrics(server_round, accepted, weights))
        self.round_log[server_round]["train"] = dict(metrics)
        for key, value in self.round_log[server_round].items():
            if isinstance(value, int | float):
                metrics[key] = value
        return metrics

    def client_replies(self, replies: Iterable[Message]) -> list[ClientReply]:
        """One :class:`ClientReply` per client: per node, or per virtual client of each cohort reply.

        A worker's reply counts only for clients sent to that worker; clients
        of a cohort message that failed as a whole get its error.
        """
        if not self.cohorts:
            return [
                ClientReply(r.metadata.src_node_id, None if r.has_error() else r.content, _error(r)) for r in replies
            ]
        answered: dict[int, ClientReply] = {}
        failed: dict[int, str] = {}  # worker -> why its cohort message failed
        for reply in replies:
            worker = reply.metadata.src_node_id
            if reply.has_error():
                failed[worker] = _error(reply)
                continue
            named = protocol.clients_in(reply.content)
            if strangers := sorted(c for c in named if self.assigned.get(c) != worker):
                log(WARNING, "worker %d replied for virtual clients it was not sent: %s (ignored)", worker, strangers)
            mine = [c for c in named if self.assigned.get(c) == worker]
            for client, part in protocol.split_reply(reply.content, mine).items():
                answered[client] = (
                    ClientReply(client, None, part) if isinstance(part, str) else ClientReply(client, part)
                )
        for client, worker in self.assigned.items():
            if client not in answered and worker in failed:
                answered[client] = ClientReply(client, None, failed[worker])
        return list(answered.values())

    def _who(self, client: int) -> str:
        return f"virtual client {client}" if self.cohorts else f"node {client}"

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Weighted average of the well-formed evaluation replies, also kept in :attr:`round_log`."""
        return self.average_evaluations(server_round + self.round_offset, self.client_replies(replies))

    def average_evaluations(self, server_round: int, replies: list[ClientReply]) -> MetricRecord | None:
        """Weighted average of the well-formed evaluation replies among ``replies`` (``client-eval`` in the log)."""
        good, weights = [], []
        for reply in replies:
            try:
                weights.append(self._weight(reply, expect_arrays=False))
            except InvalidUpdate as err:
                log(WARNING, "round %d: evaluation reply from %s excluded: %s", server_round, self._who(reply.client),
                    err)  # fmt: skip
                continue
            good.append(reply)
        if not good:
            return None
        metrics = MetricRecord(
            self._average_metrics(server_round, good, capped_weights(weights, self.max_weight_ratio))
        )
        self.round_log[server_round]["client-eval"] = dict(metrics)
        return metrics

    def _average_metrics(self, server_round: int, replies: list[ClientReply], weights: list[float]) -> dict[str, float]:
        """The replies' finite scalar metrics averaged with ``weights``; every value left out is logged."""
        records = [next(iter(r.content.metric_records.values())) for r in replies if r.content is not None]
        metrics, dropped = average_metrics(records, weights, self.weighted_by_key)
        for index, reason in dropped:
            log(WARNING, "round %d: %s: %s", server_round, self._who(replies[index].client), reason)
        return metrics

    def _weight(self, reply: ClientReply, expect_arrays: bool) -> float:
        """A reply's aggregation weight, after checking its records; :class:`InvalidUpdate` if malformed."""
        if reply.content is None:
            raise InvalidUpdate(reply.error)
        content = reply.content
        arrays = [self.arrayrecord_key] if expect_arrays else []
        if list(content.array_records) != arrays or len(content.metric_records) != 1:
            expected = f"one ArrayRecord '{self.arrayrecord_key}' and " if expect_arrays else "no ArrayRecord and "
            raise InvalidUpdate(
                f"expected {expected}one MetricRecord, got ArrayRecords {list(content.array_records)} "
                f"and MetricRecords {list(content.metric_records)}"
            )
        metrics = next(iter(content.metric_records.values()))
        return check_weight(metrics.get(self.weighted_by_key), self.weighted_by_key)

    def decode_reply(self, reply: ClientReply) -> tuple[dict[str, Tensor], float]:
        """A training reply's adapter state and aggregation weight; :class:`InvalidUpdate` if malformed."""
        weight = self._weight(reply, expect_arrays=True)
        sent = self.sent.get(reply.client)
        if sent is None or reply.content is None:
            raise InvalidUpdate("this client was not sent an adapter to train this round")
        record = reply.content[self.arrayrecord_key]
        check_record_size(record, sent)  # before anything is materialised
        try:
            state = from_record(to_record(from_record(record), self.wire_dtype))  # the values that travel on
        except (ValueError, TypeError) as err:
            raise InvalidUpdate(str(err)) from err
        check_state(state, sent)
        if self.max_update_norm:
            norm = update_norm(state, sent)
            if norm > self.max_update_norm:
                raise InvalidUpdate(f"update norm {norm:.4g} exceeds max-update-norm {self.max_update_norm:g}")
        return state, weight

    def _check_global(self, new_state: dict[str, Tensor]) -> None:
        """The new global adapter trains the old one's tensors and shapes (base tensors may change shape), all finite.

        A base tensor (FLoRA's residual) grows in rank, so only its values are checked.
        """
        check_state(trained_part(new_state), trained_part(self.global_state))
        for key, tensor in base_part(new_state).items():
            if not torch.isfinite(tensor).all():
                raise InvalidUpdate(f"'{key}' contains NaN or Inf")

    def _exclude(self, server_round: int, reply: ClientReply, reason: str) -> None:
        self._exclude_client(server_round, reply.client, reason)

    def _exclude_client(self, server_round: int, client: int, reason: str) -> None:
        log(WARNING, "round %d: reply from %s excluded: %s", server_round, self._who(client), reason)
        self._count(server_round, "excluded-replies", 1)

    def _count_down(self, server_round: int, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        sizes = (record_nbytes(record) for m in messages for record in m.content.array_records.values())
        self._count(server_round, "bytes-down", sum(sizes))
        return messages

    def _count(self, server_round: int, key: str, amount: int) -> None:
        entry = self.round_log[server_round]
        entry[key] = entry.get(key, 0) + amount


def _error(reply: Message) -> str:
    """Why a reply failed ("" if it did not)."""
    return f"client failed: {reply.error.reason}" if reply.has_error() else ""
