"""Quiet, useful output: known third-party notices off, fedlora's own warnings and logs kept.

Importing this module installs the filters. The apps import it before the rest of
fedlora, because loading fedlora pulls in transformers, peft, bitsandbytes and
(through them) matplotlib, and each prints its notices at import, in the
ServerApp's process and again in every Ray worker, where a ClientApp module is
first imported when the first message arrives. A demo's run configuration,
round lines and summary were lost among them.

A warning is filtered by the module it is attributed to: a library's notice
about its own internals is raised inside that library, while a deprecation in an
API that fedlora calls is attributed to fedlora's calling line (``stacklevel``)
and still shows. Loggers are silenced below ERROR only for the notices they are
known to repeat on every process. Flower's strategies log a page per round
(sampling, replies, aggregated metrics) that fedlora's one round line and final
summary table restate; their INFO records are dropped, their warnings kept.
fedlora logs through Flower's ``flwr`` logger too, so the filter goes by the
file a record comes from, not by logger.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from flwr.serverapp import strategy as flower_strategies

# Deprecation and future-change notices raised inside these packages concern their own code or dependencies
# (matplotlib's use of pyparsing, torch.jit, transformers' deprecated aliases used by peft, Ray's defaults).
THIRD_PARTY_MODULES = r"(matplotlib|pyparsing|torch|transformers|peft|datasets|accelerate|ray|flwr|click|typer)(\.|$)"
NOTICES: tuple[type[Warning], ...] = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
# bitsandbytes logs that its optional CPU kernels package is missing; transformers logs a load report per model
# load, listing the new classification head as missing, which fedlora initialises on purpose.
QUIET_LOGGERS = ("bitsandbytes", "transformers")
FLOWER_STRATEGIES = str(Path(flower_strategies.__file__).parent)


def _not_flower_strategy_info(record: logging.LogRecord) -> bool:
    """False for an INFO (or lower) record logged from Flower's strategy modules."""
    return record.levelno >= logging.WARNING or not record.pathname.startswith(FLOWER_STRATEGIES)


def install() -> None:
    """Ignore third-party notices (:data:`NOTICES` from :data:`THIRD_PARTY_MODULES`), quiet their loggers."""
    for category in NOTICES:
        warnings.filterwarnings("ignore", category=category, module=THIRD_PARTY_MODULES)
    # transformers sets its logger's level from this variable when it first configures logging, which
    # may come after this call; the setLevel below covers a transformers already imported.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    flower = logging.getLogger("flwr")
    if _not_flower_strategy_info not in flower.filters:  # install() may run more than once in a process
        flower.addFilter(_not_flower_strategy_info)


install()
