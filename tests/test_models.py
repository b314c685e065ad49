"""Offline model resolution: packaged models, local folders and clear errors."""

from __future__ import annotations

import pytest

from fedlora.models import ModelNotFoundError, load_base_model, load_tokenizer, model_dir, resolve_task


def test_missing_model_path_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"model '/no/such/model' is neither"):
        model_dir("/no/such/model")
    with pytest.raises(ModelNotFoundError, match=r"config\.json"):
        model_dir(str(tmp_path))


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
