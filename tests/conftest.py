"""Shared fixtures: offline models (a tiny random Llama, the real MiniLM) and Flower message helpers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from transformers import LlamaConfig, LlamaForCausalLM

from fedlora.keys import ARRAYS, METRICS, NUM_EXAMPLES
from fedlora.models import load_tokenizer, model_dir
from fedlora.wire import MANIFEST, PAYLOAD, to_record

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One torch thread per test worker: two workers of two threads each on 2 cores spin-wait on each other, which made
    # in-process training several times slower here (`flwr run`'s own processes keep torch's default).
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama with SmolLM2's real tokenizer and chat template, saved as a model folder.

    Hidden size 64 is bitsandbytes' 4-bit block size, the smallest for which its CPU repacking happens.
    """
    tokenizer = load_tokenizer(model_dir("smollm2"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def flower_identity() -> None:
    """Let tests build Flower Messages outside a running app."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def wire_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    """``state`` packed as a client sends it: in float16 if every array is float16, else in float32."""
    dtype = "float16" if {np.asarray(v).dtype for v in state.values()} == {np.dtype(np.float16)} else "float32"
    return to_record({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, dtype)


def packed(payload: np.ndarray, manifest: bytes) -> ArrayRecord:
    """A record in the packed layout with any payload and (compressed or not) manifest bytes: for crafting bad ones."""
    return ArrayRecord({PAYLOAD: Array(payload), MANIFEST: Array(np.frombuffer(manifest, np.uint8))})


def reply(node_id: int, state: dict[str, np.ndarray] | None, num_examples: object = 10, **metrics: float) -> Message:
    """A training reply from ``node_id`` carrying ``state`` (or an error when ``state`` is None)."""
    TaskIdentity.node_id = node_id  # Flower stamps the sender from the process's identity
    if state is None:
        instruction = Message(content=RecordDict(), dst_node_id=node_id, message_type="train")
        message = Message(error=Error(code=1, reason="client crashed"), reply_to=instruction)
    else:
        content = RecordDict(
            {
                ARRAYS: wire_record(state),
                METRICS: MetricRecord({NUM_EXAMPLES: num_examples, "train-loss": 1.0, **metrics}),
            }
        )
        message = Message(content=content, dst_node_id=0, message_type="train")
    return message
