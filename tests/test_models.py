"""Offline model resolution: packaged models, local folders, Hugging Face ids from the cache, and clear errors."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants
from transformers import BitsAndBytesConfig, dynamic_module_utils

from fedlora import runtime
from fedlora.config import ConfigError, from_run_config
from fedlora.models import CAUSAL_LM, ModelNotFoundError, load_base_model, load_tokenizer, model_dir, resolve_task

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face hub cache in ``tmp_path``, offline, as ``HF_HOME`` and ``HF_HUB_OFFLINE=1`` would make it.

    huggingface_hub reads those variables once, when it is imported, into
    ``huggingface_hub.constants``; transformers and huggingface_hub read the
    constants at call time. So the variables are set for any child process, and
    the constants for this one.
    """
    hub = tmp_path / "hub"
    hub.mkdir()
    for name, value in {"HF_HOME": str(tmp_path), "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


def put_in_hub_cache(hub: Path, repo_id: str, folder: Path, repo_type: str = "model") -> None:
    """Lay ``folder`` out as the hub's download of ``repo_id`` would: ``<type>s--org--name/snapshots/<rev>``."""
    repo = hub / f"{repo_type}s--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)


def test_missing_model_path_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"model '/no/such/model' is neither .* nor a Hugging Face id"):
        model_dir("/no/such/model")
    with pytest.raises(ModelNotFoundError, match=r"config\.json"):
        model_dir(str(tmp_path))


def test_a_quantised_base_without_bitsandbytes_names_the_extra(tiny_llama: Path, monkeypatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a)
    )
    with pytest.raises(
        ConfigError, match=r"needs bitsandbytes, an optional dependency: pip install 'fedlora\[quant\]'"
    ):
        load_base_model(tiny_llama, CAUSAL_LM, 0, BitsAndBytesConfig(load_in_4bit=True))


def test_unreadable_model_folder_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises((ModelNotFoundError, OSError), match=str(tmp_path)):
        load_base_model(tmp_path, "causal-lm", 0)


def test_smollm2_is_converted_once_to_a_fast_folder() -> None:
    folder = model_dir("smollm2")
    assert (folder / "model.safetensors").is_file() and model_dir("smollm2") == folder
    model = load_base_model(folder, "causal-lm", 0)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert load_tokenizer(folder).chat_template


def test_task_auto() -> None:
    assert resolve_task("minilm", "auto") == "classification"
    assert resolve_task("smollm2", "auto") == "causal-lm"
    assert resolve_task("minilm", "causal-lm") == "causal-lm"


def test_model_by_hugging_face_id_loads_from_the_offline_cache(hub_cache: Path, tiny_llama: Path) -> None:
    put_in_hub_cache(hub_cache, "fedlora-test/tiny-llama", tiny_llama)
    assert model_dir("fedlora-test/tiny-llama") == "fedlora-test/tiny-llama"  # from_pretrained resolves it
    bench = runtime.workbench(from_run_config({"model.name": "fedlora-test/tiny-llama"}), reuse=False)
    assert bench.model.get_base_model().config.hidden_size == 64  # the tiny model, not a packaged one
    assert bench.tokenizer.chat_template


def test_missing_model_id_offline_says_the_cache_is_empty(hub_cache: Path, tiny_llama: Path) -> None:
    put_in_hub_cache(hub_cache, "fedlora-test/tiny-llama", tiny_llama)  # another model is cached; not this one
    with pytest.raises(ModelNotFoundError) as err:
        model_dir("fedlora-test/absent")
    message = str(err.value)
    assert "'fedlora-test/absent'" in message and f"cache {hub_cache} is empty for it" in message
    assert "HF_HUB_OFFLINE" in message


def test_remote_code_runs_only_when_trusted(
    hub_cache: Path, tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # transformers copies a model's code into HF_MODULES_CACHE (read at import) and puts that on sys.path
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    folder = tmp_path / "custom"
    shutil.copytree(tiny_llama, folder)
    (folder / "custom.py").write_text(  # an architecture transformers does not know: only its own code loads it
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'fedlora-custom'\n\n\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "fedlora-custom"
    config["auto_map"] = {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    put_in_hub_cache(hub_cache, "fedlora-test/custom", folder)
    overrides = {"model.name": "fedlora-test/custom", "adapter.target-modules": "q_proj,v_proj"}
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        runtime.workbench(from_run_config(overrides), reuse=False)
    trusted = from_run_config({**overrides, "model.trust-remote-code": True})
    assert type(runtime.workbench(trusted, reuse=False).model.get_base_model()).__name__ == "CustomForCausalLM"
