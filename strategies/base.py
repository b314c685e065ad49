"""The base every fedlora strategy builds on.

:class:`AdapterStrategy` is Flower's ``FedAvg`` (sampling, message building,
metric aggregation) plus what adapters need:

* every training reply is decoded and checked against the global adapter that
  was sent (keys, shapes, dtype, finite values, a positive ``num-examples``,
  optionally a bound on the update's norm); a bad reply is excluded with a
  logged reason naming the node, and the round goes on with the rest; with
  fewer than ``min_replies`` good replies the global adapter stays as it was;
* rounds can start after 1 (``round_offset``), so a resumed run numbers them,
  and tells clients, as the interrupted run would have;
* bytes sent and received are counted per round;
* the new global adapter is rounded to the transport dtype, so the server's
  evaluation, the clients and the saved adapter all see the same numbers.

A strategy only implements :meth:`AdapterStrategy.aggregate_states`, a function
from the accepted clients' states and weights to the new global state, usually
by calling the pure functions of :mod:`fedlora.aggregation`.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections import defaultdict
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import Tensor

from fedlora.validation import InvalidUpdate, check_state, check_weight
from fedlora.wire import from_record, record_nbytes, to_record


class AdapterStrategy(FedAvg):
    """FedAvg's orchestration with validated, byte-counted adapter aggregation.

    Parameters are Flower ``FedAvg``'s, plus ``wire_dtype`` (``float32`` or
    ``float16``), the dtype the global adapter is sent in; ``min_replies``, the
    fewest good replies a round aggregates; ``max_update_norm``, the largest
    accepted L2 norm of a reply's update (0: no bound).
    """

    def __init__(
        self, *, wire_dtype: str = "float32", min_replies: int = 1, max_update_norm: float = 0.0, **fedavg_kwargs: Any
    ) -> None:
        super().__init__(**fedavg_kwargs)
        self.wire_dtype = wire_dtype
        self.min_replies = min_replies
        self.max_update_norm = max_update_norm
        self.round_offset = 0  # rounds already done by an earlier, interrupted run
        self.global_state: dict[str, Tensor] = {}
        # Per round: bytes, exclusions, aggregated metrics and whatever a subclass
        # records; JSON-serialisable, written to metrics.json by the server app.
        self.round_log: dict[int, dict[str, Any]] = defaultdict(dict)

    @abstractmethod
    def aggregate_states(
        self, server_round: int, states: list[dict[str, Tensor]], weights: list[float]
    ) -> dict[str, Tensor]:
        """New global adapter state from the accepted clients' states (float32) and weights."""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's sampling; remembers the adapter sent, to check replies against it."""
        server_round += self.round_offset
        self.global_state = from_record(arrays)
        return self._count_down(server_round, super().configure_train(server_round, arrays, config, grid))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's evaluation sampling, with bytes counted."""
        server_round += self.round_offset
        return self._count_down(server_round, super().configure_evaluate(server_round, arrays, config, grid))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check each reply, aggregate the good ones, keep the global adapter if too few are good."""
        server_round += self.round_offset
        accepted: list[Message] = []
        states, weights = [], []
        for reply in replies:
            try:
                state, weight = self.decode_reply(reply)
            except InvalidUpdate as err:
                self._exclude(server_round, reply, str(err))
                continue
            self._count(server_round, "bytes-up", record_nbytes(reply.content[self.arrayrecord_key]))
            accepted.append(reply)
            states.append(state)
            weights.append(weight)
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
        new_state = self.aggregate_states(server_round, states, weights)
        check_state(new_state, self.global_state)  # a strategy bug must not ship a broken adapter
        metrics = self.train_metrics_aggr_fn([r.content for r in accepted], self.weighted_by_key)
        self.round_log[server_round]["train"] = dict(metrics)
        for key, value in self.round_log[server_round].items():
            if isinstance(value, int | float):
                metrics[key] = value
        return to_record(new_state, self.wire_dtype), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Weighted average of the well-formed evaluation replies, also kept in :attr:`round_log`."""
        server_round += self.round_offset
        good = []
        for reply in replies:
            try:
                self._weight(reply, expect_arrays=False)
            except InvalidUpdate as err:
                log(
                    WARNING,
                    "round %d: evaluation reply from node %d excluded: %s",
                    server_round,
                    reply.metadata.src_node_id,
                    err,
                )
                continue
            good.append(reply.content)
        if not good:
            return None
        metrics = self.evaluate_metrics_aggr_fn(good, self.weighted_by_key)
        self.round_log[server_round]["client-eval"] = dict(metrics)
        return metrics

    def _weight(self, reply: Message, expect_arrays: bool) -> float:
        """A reply's aggregation weight, after checking its records; :class:`InvalidUpdate` if malformed."""
        if reply.has_error():
            raise InvalidUpdate(f"client failed: {reply.error.reason}")
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

    def decode_reply(self, reply: Message) -> tuple[dict[str, Tensor], float]:
        """A training reply's adapter state and aggregation weight; :class:`InvalidUpdate` if malformed."""
        weight = self._weight(reply, expect_arrays=True)
        try:
            state = from_record(reply.content[self.arrayrecord_key])
        except (ValueError, TypeError) as err:
            raise InvalidUpdate(str(err)) from err
        check_state(state, self.global_state)
        if self.max_update_norm:
            norm = math.sqrt(sum(float((state[k] - v).square().sum()) for k, v in self.global_state.items()))
            if norm > self.max_update_norm:
                raise InvalidUpdate(f"update norm {norm:.4g} exceeds max-update-norm {self.max_update_norm:g}")
        return state, weight

    def _exclude(self, server_round: int, reply: Message, reason: str) -> None:
        log(WARNING, "round %d: reply from node %d excluded: %s", server_round, reply.metadata.src_node_id, reason)
        self._count(server_round, "excluded-replies", 1)

    def _count_down(self, server_round: int, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        self._count(server_round, "bytes-down", sum(record_nbytes(m.content[self.arrayrecord_key]) for m in messages))
        return messages

    def _count(self, server_round: int, key: str, amount: int) -> None:
        entry = self.round_log[server_round]
        entry[key] = entry.get(key, 0) + amount
