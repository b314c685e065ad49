"""``fedlora generate``: answers from a base model and an adapter folder, batched, greedy or sampled."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import GenerationConfig

from fedlora.cli import main
from fedlora.generate import generate, load_for_generation
from fedlora.models import CAUSAL_LM, load_base_model

PROMPTS = ["What is AI?", "Say hi.", "Name a colour of the sky on a clear summer day, and say why it is so."]


def run_cli(tiny_llama: Path, tmp_path: Path, *extra: str) -> list[dict[str, str]]:
    out = tmp_path / "answers.jsonl"
    argv = ["generate", "--model", str(tiny_llama), "--adapter", str(tmp_path / "adapter")]
    argv += ["--prompts", str(tmp_path / "prompts.txt"), "--out", str(out), "--max-new-tokens", "6", *extra]
    assert main(argv) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_generate_batched_greedy_and_sampled(tiny_llama: Path, tmp_path: Path) -> None:
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=False)
    torch.manual_seed(0)  # the random adapter, whatever ran before in this process (some answer EOS at once)
    get_peft_model(load_base_model(tiny_llama, CAUSAL_LM, 0), lora).save_pretrained(tmp_path / "adapter")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")

    greedy = run_cli(tiny_llama, tmp_path, "--batch-size", "3")
    assert [row["prompt"] for row in greedy] == PROMPTS and all(row["answer"] for row in greedy)
    model, tokenizer = load_for_generation(str(tiny_llama), tmp_path / "adapter")
    config = GenerationConfig(max_new_tokens=6, do_sample=False)
    alone = [generate(model, tokenizer, [prompt], config)[0] for prompt in PROMPTS]
    assert [row["answer"] for row in greedy] == alone  # left padding: a batch answers as each prompt alone
    with model.disable_adapter():
        assert generate(model, tokenizer, PROMPTS, config) != alone  # the adapter is what answers

    sampled = run_cli(tiny_llama, tmp_path, "--temperature", "1.0", "--seed", "1")
    assert sampled == run_cli(tiny_llama, tmp_path, "--temperature", "1.0", "--seed", "1")  # seeded
    assert sampled != greedy
