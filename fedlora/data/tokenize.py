"""Tokenisation for the three tasks, and the collators that batch them.

Causal LM: the example becomes a chat (user = ``prompt``, assistant = ``response``)
through the tokenizer's chat template (its own, none, or a file: ``model.chat-template``,
set by :func:`fedlora.models.load_tokenizer`), and only the answer's tokens carry a
label, so the model learns to answer rather than to repeat the question.
Classification: ``text`` with its ``label``. Reward: a preference pair, the
chat with the chosen answer (``response``) and the chat with the rejected one
(:mod:`fedlora.data.preferences`); batched as the chosen chats, then the rejected
ones (:mod:`fedlora.reward`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from datasets import Dataset
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, PreTrainedTokenizerBase

from fedlora.data.preferences import REJECTED
from fedlora.models import CLASSIFICATION, REWARD

IGNORE_INDEX = -100  # label value that cross-entropy skips
REJECTED_IDS = "rejected_input_ids"  # a tokenised preference pair: the chosen chat is its input_ids


def chat_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """``prompt`` as the model sees it in training, up to where the answer starts (what generation continues)."""
    if tokenizer.chat_template is None:
        return f"{prompt}\n"
    user = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)


def _chat_texts(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str) -> tuple[str, str]:
    """(prompt part, full text) in the model's chat format; a plain format if it has none."""
    head = chat_prompt(tokenizer, prompt)
    if tokenizer.chat_template is None:
        return head, head + response + (tokenizer.eos_token or "")
    user = [{"role": "user", "content": prompt}]
    full = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(head):  # the answer's labels start where the prompt part ends
        raise ValueError(
            "the chat template renders a prompt differently with and without its answer, so the answer's tokens "
            f"cannot be told apart (model.chat-template): {head!r} is not the start of {full!r}"
        )
    return head, full


def _lm_example(tokenizer: PreTrainedTokenizerBase, max_length: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def encode(row: dict[str, Any]) -> dict[str, Any]:
        head, full = _chat_texts(tokenizer, row["prompt"], row["response"])
        encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=tokenizer.is_fast)
        if tokenizer.is_fast:  # the answer starts at the first token reaching past the prompt part's characters,
            # also where a token spans both (a template ending in a space: " Hi" is the answer's first token)
            ends = [end for _, end in encoded["offset_mapping"]]
            start = next((i for i, end in enumerate(ends) if end > len(head)), len(ends))
        else:
            start = len(tokenizer(head, add_special_tokens=False)["input_ids"])
        ids = encoded["input_ids"][:max_length]
        labels = [IGNORE_INDEX] * min(start, len(ids)) + ids[start:]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    return encode


def _pair_example(tokenizer: PreTrainedTokenizerBase, max_length: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def encode(row: dict[str, Any]) -> dict[str, Any]:
        answers = {"input_ids": row["response"], REJECTED_IDS: row[REJECTED]}
        chats = {key: _chat_texts(tokenizer, row["prompt"], answer)[1] for key, answer in answers.items()}
        special = tokenizer.chat_template is None  # a chat template writes its own; an encoder needs its [CLS]
        return {
            key: tokenizer(text, add_special_tokens=special)["input_ids"][:max_length] for key, text in chats.items()
        }

    return encode


def tokenize(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, task: str, max_length: int) -> Dataset:
    """Tokenise for ``task``; causal-LM examples whose answer is cut off entirely are dropped."""
    if task == REWARD:
        return dataset.map(_pair_example(tokenizer, max_length), remove_columns=dataset.column_names)
    if task == CLASSIFICATION:
        encoded = dataset.map(
            lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
            batched=True,
        )
        encoded = encoded.rename_column("label", "labels")
    else:
        encoded = dataset.map(_lm_example(tokenizer, max_length))
        # Predicting token t+1 needs a label after the first position.
        encoded = encoded.filter(lambda row: any(label != IGNORE_INDEX for label in row["labels"][1:]))
    keep = {"input_ids", "attention_mask", "labels"}
    return encoded.remove_columns([c for c in encoded.column_names if c not in keep])


def collator(tokenizer: PreTrainedTokenizerBase, task: str) -> Callable[[list[dict[str, Any]]], Any]:
    """Pad a list of tokenised examples into a batch of tensors (labels padded with -100)."""
    if task == REWARD:
        return lambda rows: dict(
            tokenizer.pad(
                [{"input_ids": row[key]} for key in ("input_ids", REJECTED_IDS) for row in rows], return_tensors="pt"
            )
        )
    if task == CLASSIFICATION:
        return DataCollatorWithPadding(tokenizer, return_tensors="pt")
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")
