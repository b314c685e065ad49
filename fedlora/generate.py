"""Answers from trained adapters: the base model, the adapter folders runs saved, and a file of prompts.

Prompts are put in the chat format the adapter was trained on
(:func:`fedlora.data.tokenize.chat_prompt`) and generated in batches, padded on
the left so every row's answer starts right after its own prompt.

Many adapters over one base (the personal and per-task adapters a federation
produces) are served as S-LoRA does (Sheng et al., "S-LoRA: Serving Thousands of
Concurrent LoRA Adapters", MLSys 2024, https://arxiv.org/abs/2311.03285): one
base in memory, every adapter loaded beside it, and a batch whose rows use
different adapters runs as one forward pass of the base, each row through its
own adapter (peft's mixed-batch inference, ``adapter_names``; LoRA-type adapters).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from peft import PeftModel
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from fedlora.data.tokenize import chat_prompt
from fedlora.keys import BASE_ONLY, SHARED_ADAPTER
from fedlora.methods import all_methods, load_saved
from fedlora.models import CAUSAL_LM, load_base_model, load_tokenizer, model_dir, remote_code


def read_requests(path: Path) -> list[dict[str, str]]:
    """Requests from a JSON-lines file (a ``prompt``, and an ``adapter`` when serving several) or a text file.

    A text file holds one prompt per line.
    """
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in lines]
    return [{"prompt": line} for line in lines]


def load_for_generation(
    model_name: str,
    adapter: Path | Mapping[str, Path],
    trust_remote_code: bool = False,
    chat_template: str = "auto",
) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """The base (``model.name`` as a run takes it) with an adapter folder on top, and its tokenizer.

    ``adapter`` may map names to folders instead: all of them are loaded over
    the one base, under those names, for :func:`generate`'s ``adapters``.
    ``chat_template`` is the run's ``model.chat-template``, so prompts are put as training put them.
    """
    folders = dict(adapter) if isinstance(adapter, Mapping) else {SHARED_ADAPTER: adapter}
    (first, folder), *rest = folders.items()
    ref = model_dir(model_name)
    all_methods()  # importing every method registers fedlora's own peft tuners (bottleneck) for peft's loader
    with remote_code(trust_remote_code):
        tokenizer = load_tokenizer(ref, chat_template)
        base = load_base_model(ref, CAUSAL_LM, 0)
        if not rest:  # one folder, whichever method saved it (LoRAMoE's routers are files beside peft's)
            model = load_saved(base, folder)
        else:  # mixed batches: LoRA-type adapters, each under its name
            model = PeftModel.from_pretrained(base, folder, adapter_name=first)
    for name, folder in rest:
        model.load_adapter(folder, adapter_name=name)
    return model.eval(), tokenizer


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    config: GenerationConfig,
    batch_size: int = 8,
    adapters: list[str] | None = None,
) -> list[str]:
    """One answer per prompt, ``batch_size`` prompts at a time (greedy or sampled, as ``config`` says).

    ``adapters`` names each prompt's adapter (``"__base__"``: none); a batch
    then mixes adapters, each row through its own, in one pass of the base.
    Without it every prompt goes through the active adapter. The tokenizer pads
    on the left meanwhile and is given back as it came (a worker's tokenizer
    also pads its training batches, on the right).
    """
    if adapters is not None:
        if len(adapters) != len(prompts):
            raise ValueError(f"{len(adapters)} adapter names for {len(prompts)} prompts")
        if unknown := sorted(set(adapters) - {*model.peft_config, BASE_ONLY}):
            raise ValueError(f"unknown adapter(s) {', '.join(unknown)}; loaded: {', '.join(model.peft_config)}")
    config = copy.copy(config)
    config.pad_token_id = tokenizer.pad_token_id  # many decoders have none of their own (load_tokenizer sets it)
    device = next(model.parameters()).device
    answers: list[str] = []
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # a decoder continues the last position
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [chat_prompt(tokenizer, prompt) for prompt in prompts[start : start + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            mixed = {} if adapters is None else {"adapter_names": adapters[start : start + batch_size]}
            with torch.inference_mode():
                output = model.generate(**batch, generation_config=config, **mixed)
            answers += tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [answer.strip() for answer in answers]
