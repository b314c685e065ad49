"""QLoRA: LoRA on a base quantised to 4-bit NF4 with bitsandbytes.

Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", NeurIPS 2023,
https://arxiv.org/abs/2305.14314. The adapter and what travels are LoRA's; only
the frozen base changes: NF4 weights (optionally double-quantised), de-quantised
to ``qlora.compute-dtype`` for each matmul. The quantised base is built once per
worker process (:mod:`fedlora.runtime` caches it), never per round.

On CPU, bitsandbytes' ``Linear4bit`` repacks its weights into an inference
layout at the first forward under ``no_grad`` when the CPU has AVX512-BF16;
after that its forward has no autograd path and every LoRA gradient is zero.
:func:`keep_trainable_on_cpu` switches that repacking off before any forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from peft import prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig, PreTrainedModel

from fedlora.config import RunConfig, opt
from fedlora.methods.lora import LORA_OPTIONS, Lora
from fedlora.models import FULL_PRECISION_MODULES, load_base_model


@dataclass(frozen=True)
class QLoraSettings:
    """The 4-bit base of ``adapter.method='qlora'`` (bitsandbytes)."""

    section: ClassVar[str] = "qlora"

    double_quant: bool = opt(True, "Quantise the quantisation constants too (saves ~0.4 bit/param).")
    compute_dtype: str = opt(
        "float32", "Dtype the 4-bit weights are de-quantised to for matmuls.", ("float32", "bfloat16", "float16")
    )


def keep_trainable_on_cpu(model: torch.nn.Module) -> None:
    """Stop every ``Linear4bit`` from repacking for inference (which would zero LoRA gradients on CPU)."""
    import bitsandbytes as bnb  # optional backend: loaded only where a quantised base is built

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


class QLora(Lora):
    """LoRA over a 4-bit NF4 base."""

    name = "qlora"
    settings = QLoraSettings
    uses = LORA_OPTIONS - {"model.load-in-8bit"}  # its base is 4-bit already

    def load_base(self, path: Path, task: str, num_labels: int, cfg: RunConfig) -> PreTrainedModel:
        """Load the base quantised to NF4 and prepared for k-bit training."""
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=cfg.qlora.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, cfg.qlora.compute_dtype),
            llm_int8_skip_modules=FULL_PRECISION_MODULES,
        )
        model = load_base_model(path, task, num_labels, quantization=quantization)
        keep_trainable_on_cpu(model)
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
