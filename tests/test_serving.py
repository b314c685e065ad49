"""Many adapters over one base: a mixed batch answers as each request through its own adapter alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GenerationConfig

from fedlora.cli import main
from fedlora.generate import generate, load_for_generation
from fedlora.keys import BASE_ONLY
from fedlora.models import CAUSAL_LM, load_base_model

NAMES = ["alice", "bob", "carol"]
REQUESTS = [
    ("What is AI?", "alice"),
    ("Say hi.", "bob"),
    ("Name a colour of the sky.", "carol"),
    ("Who are you?", "alice"),
    ("Tell me a joke.", BASE_ONLY),
    ("What is two plus two?", "bob"),
]


@pytest.fixture(scope="module")
def adapters(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three different random LoRA adapters of the tiny Llama, saved as runs save them."""
    folders = {}
    for seed, name in enumerate(NAMES):
        torch.manual_seed(seed)
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=False)
        folders[name] = tmp_path_factory.mktemp(name)
        get_peft_model(load_base_model(tiny_llama, CAUSAL_LM, 0), lora).save_pretrained(folders[name])
    return folders


def test_a_mixed_batch_equals_each_adapter_on_its_own(tiny_llama: Path, adapters: dict[str, Path]) -> None:
    model, tokenizer = load_for_generation(str(tiny_llama), adapters)
    assert set(model.peft_config) == set(NAMES)
    prompts, names = [p for p, _ in REQUESTS], [n for _, n in REQUESTS]
    config = GenerationConfig(max_new_tokens=6, do_sample=False)
    mixed = generate(model, tokenizer, prompts, config, batch_size=len(prompts), adapters=names)

    alone = []
    for prompt, name in REQUESTS:
        if name == BASE_ONLY:
            with model.disable_adapter():
                alone += generate(model, tokenizer, [prompt], config)
        else:
            model.set_adapter(name)
            alone += generate(model, tokenizer, [prompt], config)
    assert mixed == alone
    assert len(set(generate(model, tokenizer, [prompts[0]] * 3, config, adapters=NAMES))) > 1  # they differ

    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch, adapter_names=names).logits
        for row, name in enumerate(names):
            one = {k: v[row : row + 1] for k, v in batch.items()}
            if name == BASE_ONLY:
                with model.disable_adapter():
                    expected = model(**one).logits
            else:
                model.set_adapter(name)
                expected = model(**one).logits
            torch.testing.assert_close(logits[row : row + 1], expected, atol=1e-5, rtol=1e-4)

    with pytest.raises(ValueError, match=r"unknown adapter\(s\) dave"):
        generate(model, tokenizer, prompts[:1], config, adapters=["dave"])


def test_cli_serves_requests_that_name_their_adapters(
    tiny_llama: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps({"prompt": p, "adapter": n}) + "\n" for p, n in REQUESTS))
    argv = ["generate", "--model", str(tiny_llama), "--adapters", *(f"{n}={f}" for n, f in adapters.items())]
    argv += ["--prompts", str(requests), "--max-new-tokens", "4", "--batch-size", "4", "--out", str(tmp_path / "a")]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "a").read_text().splitlines()]
    assert [(r["prompt"], r["adapter"]) for r in rows] == REQUESTS and all("answer" in r for r in rows)

    unnamed = tmp_path / "unnamed.jsonl"
    unnamed.write_text(json.dumps({"prompt": "which adapter?"}) + "\n")
    assert main([*argv[: argv.index("--prompts")], "--prompts", str(unnamed)]) == 2
    assert main(["generate", "--model", str(tiny_llama), "--adapters", "alice", "--prompts", str(requests)]) == 2
