#!/usr/bin/env bash
# Set up on a fresh machine, then lint and run the whole test suite (what CI runs) on two pytest-xdist workers:
# the end-to-end runs spend much of their time starting processes and polling, so two overlap well on 2 cores
# (each `flwr run` gets its own SuperLink ports, see simulations/run.py). Extra arguments go to pytest:
#   bash tests/run.sh -m "not slow"    # the fast tier for day-to-day work: unit tests only, well under 3 minutes
#   bash tests/run.sh -m e2e           # only what runs `flwr run`, a deployment or another process
#   bash tests/run.sh -n 0 -k wire     # one process, selected tests
# Markers (pyproject.toml): `e2e`, `slow` for anything over about 10 seconds on 2 cores, and `multihost` for the
# tests across hosts made with network namespaces (root or CAP_NET_ADMIN; skipped without): `-m multihost`.
# Measured 2026-11-26 on 2 quiet cores (venv already set up): everything, 15 min 43 s with setup (453 passed,
# 1 skipped); fast tier, 408 tests (401 took 71 s). Test workers use one torch thread each (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -n 2 --dist worksteal "$@"
