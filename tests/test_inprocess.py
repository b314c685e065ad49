"""The in-process grid delivers messages as a SuperLink would: copies, error replies, a node's own context."""

from __future__ import annotations

import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from simulations.inprocess import FIRST_NODE_ID, InProcessGrid

pytestmark = pytest.mark.usefixtures("flower_identity")

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Add one to the received array, count calls in the node's state, draw a random number; fail on request."""
    if "fail" in msg.content:
        raise RuntimeError("out of memory")
    array = msg.content.array_records["w"]["x"].numpy()
    array += 1  # in place: must not reach the server's copy
    calls = int(context.state.metric_records["n"]["calls"]) + 1 if "n" in context.state else 1
    context.state["n"] = MetricRecord({"calls": calls})
    random.random()
    content = RecordDict(
        {
            "w": ArrayRecord({"x": Array(array)}),
            "m": MetricRecord({"calls": calls, "partition": int(context.node_config["partition-id"])}),
        }
    )
    return Message(content, reply_to=msg)


def grid(nodes: int = 2) -> InProcessGrid:
    return InProcessGrid(app, [{"partition-id": i, "num-partitions": nodes} for i in range(nodes)], {})


def send(g: InProcessGrid, node: int, content: RecordDict) -> Message:
    (reply,) = g.send_and_receive([Message(content, node, "train")])
    return reply


def test_a_reply_is_a_copy_from_the_right_node_with_its_own_state() -> None:
    g, sent = grid(), np.zeros(3, dtype=np.float32)
    node = FIRST_NODE_ID + 1
    message = Message(RecordDict({"w": ArrayRecord({"x": Array(sent)})}), node, "train")
    (reply,) = g.send_and_receive([message])
    assert reply.metadata.reply_to_message_id == message.metadata.message_id
    assert reply.metadata.src_node_id == node
    assert np.array_equal(reply.content.array_records["w"]["x"].numpy(), np.ones(3))
    assert np.array_equal(message.content.array_records["w"]["x"].numpy(), sent)  # the server's copy is untouched
    assert reply.content.metric_records["m"]["partition"] == 1
    assert send(g, node, message.content).content.metric_records["m"]["calls"] == 2  # context.state persists
    assert send(g, FIRST_NODE_ID, message.content).content.metric_records["m"]["calls"] == 1  # per node


def test_an_exception_or_an_unknown_node_is_an_error_reply() -> None:
    g = grid()
    failed = send(g, FIRST_NODE_ID, RecordDict({"fail": MetricRecord({"x": 1})}))
    assert failed.has_error() and "out of memory" in failed.error.reason
    assert send(g, 7, RecordDict()).has_error()
    assert list(g.pull_messages(["never-sent"])) == []


def test_clients_draw_from_their_own_random_state() -> None:
    random.seed(0)
    expected = [random.random() for _ in range(2)]
    random.seed(0)
    g = grid()
    first = random.random()
    send(g, FIRST_NODE_ID, RecordDict({"w": ArrayRecord({"x": Array(np.zeros(1, dtype=np.float32))})}))
    assert [first, random.random()] == expected
