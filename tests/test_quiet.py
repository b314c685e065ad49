"""fedlora.quiet: third-party notices are filtered in the apps; fedlora's own warnings and logs are not."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import pytest

from fedlora import quiet
from simulations.run import ROOT

THIRD_PARTY = [
    ("matplotlib._fontconfig_pattern", DeprecationWarning),  # pyparsing's deprecations, raised in matplotlib
    ("torch.jit._script", DeprecationWarning),
    ("transformers.modeling_utils", FutureWarning),
    ("ray._private.worker", FutureWarning),
]
OURS = [
    ("fedlora.config", DeprecationWarning),
    ("strategies.base", FutureWarning),
    ("client_app.app", UserWarning),
    ("fedlora.wire", UserWarning),
]


def emit(warnings_by_module: list[tuple[str, type[Warning]]]) -> None:
    for module, category in warnings_by_module:
        warnings.warn_explicit(f"{module} {category.__name__}", category, f"{module}.py", 1, module=module)


def test_third_party_notices_are_hidden_and_fedloras_own_warnings_and_logs_kept() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # what pytest and Python's defaults would show or hide does not count
        quiet.install()
        emit(THIRD_PARTY + OURS)
    assert [str(w.message) for w in caught] == [f"{module} {category.__name__}" for module, category in OURS]
    assert not logging.getLogger("bitsandbytes.backends.cpu.ops").isEnabledFor(logging.WARNING)


@pytest.mark.parametrize(
    "path, level, kept",
    [
        (f"{quiet.FLOWER_STRATEGIES}/strategy.py", logging.INFO, False),  # "[ROUND 1/3]", "Final results:" ...
        (f"{quiet.FLOWER_STRATEGIES}/fedavg.py", logging.WARNING, True),
        (f"{ROOT}/fedlora/report.py", logging.INFO, True),  # fedlora's round line, through the same logger
    ],
)
def test_flower_strategy_chatter_is_dropped_and_fedloras_logs_kept(path: str, level: int, kept: bool) -> None:
    flower = logging.getLogger("flwr")
    quiet.install()
    assert bool(flower.filter(flower.makeRecord("flwr", level, path, 1, "message", (), None))) is kept
    assert flower.isEnabledFor(logging.INFO)


@pytest.mark.e2e
@pytest.mark.slow
def test_importing_the_apps_prints_no_third_party_notice() -> None:
    """The filters precede the imports that raise the notices, in a fresh process as in a Ray worker."""
    script = "import client_app.app, server_app.app; print('imported')"
    done = subprocess.run(
        [sys.executable, "-W", "always", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "imported", done.stderr[-3000:]
    for notice in ("PyparsingDeprecationWarning", "torch.jit", "gemm_4bit_forward", "classic.mplstyle"):
        assert notice not in done.stderr, done.stderr[-3000:]
