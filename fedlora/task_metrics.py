"""Task metrics on generated answers: exact match for classification-as-generation and short-answer tasks.

The loss and perplexity say how likely the reference answers are; a task
metric says whether the model, asked the question, answers it: each prompt is
answered greedily (:func:`fedlora.generate.generate`, the chat format of
training) and the answer is compared with the reference after SQuAD's
normalisation (Rajpurkar et al., 2016): lower case, punctuation and the
articles a/an/the dropped, whitespace collapsed. So "The Cat." matches "cat".
"""

from __future__ import annotations

import re
import string

from datasets import Dataset
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from fedlora.generate import generate

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalise_answer(text: str) -> str:
    """``text`` as SQuAD compares answers: lower case, no punctuation or articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def exact_match(answers: list[str], references: list[str]) -> float:
    """The fraction of answers equal to their reference after :func:`normalise_answer`."""
    if len(answers) != len(references) or not answers:
        raise ValueError(f"exact match needs as many answers as references, at least one ({len(answers)} answers)")
    return sum(normalise_answer(a) == normalise_answer(r) for a, r in zip(answers, references, strict=True)) / len(
        answers
    )


def greedy_exact_match(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Dataset,
    max_new_tokens: int,
    batch_size: int,
) -> float:
    """Exact match of the greedy answers to ``rows``' ``prompt`` against their ``response``.

    Rows are generated in order of prompt length, so a batch pads little; the
    model is put in evaluation mode (no dropout), as for the loss.
    """
    model.eval()
    rows = rows.select(sorted(range(len(rows)), key=lambda i: len(rows[i]["prompt"])))
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False)
    answers = generate(model, tokenizer, list(rows["prompt"]), config, batch_size)
    return exact_match(answers, list(rows["response"]))
