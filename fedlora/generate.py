"""Answers from a trained adapter: the base model, the adapter folder a run saved, and a file of prompts.

Prompts are put in the chat format the adapter was trained on
(:func:`fedlora.data.tokenize.chat_prompt`) and generated in batches, padded on
the left so every row's answer starts right after its own prompt.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from peft import PeftModel
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from fedlora.data.tokenize import chat_prompt
from fedlora.models import CAUSAL_LM, load_base_model, load_tokenizer, model_dir, remote_code


def read_prompts(path: Path) -> list[str]:
    """Prompts from a JSON-lines file (the ``prompt`` field of each record) or a text file (one per line)."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        return [json.loads(line)["prompt"] for line in lines]
    return lines


def load_for_generation(
    model_name: str, adapter: Path, trust_remote_code: bool = False, chat_template: str = "auto"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base (``model.name`` as a run takes it) with the adapter folder on top, and its tokenizer.

    ``chat_template`` is the run's ``model.chat-template``, so prompts are put as training put them.
    """
    ref = model_dir(model_name)
    with remote_code(trust_remote_code):
        tokenizer = load_tokenizer(ref, chat_template)
        model = PeftModel.from_pretrained(load_base_model(ref, CAUSAL_LM, 0), adapter)
    return model.eval(), tokenizer


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    config: GenerationConfig,
    batch_size: int = 8,
) -> list[str]:
    """One answer per prompt, ``batch_size`` prompts at a time (greedy or sampled, as ``config`` says).

    The tokenizer pads on the left meanwhile and is given back as it came (a
    worker's tokenizer also pads its training batches, on the right).
    """
    config = copy.copy(config)
    config.pad_token_id = tokenizer.pad_token_id  # many decoders have none of their own (load_tokenizer sets it)
    device = next(model.parameters()).device
    answers: list[str] = []
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # a decoder continues the last position
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [chat_prompt(tokenizer, prompt) for prompt in prompts[start : start + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.inference_mode():
                output = model.generate(**batch, generation_config=config)
            answers += tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [answer.strip() for answer in answers]
