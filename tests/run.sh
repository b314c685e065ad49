#!/usr/bin/env bash
# Set up on a fresh machine, then lint and run the whole test suite (CPU only, about 23 minutes on 2 cores
# once set up). Extra arguments go to pytest, e.g. `bash tests/run.sh -k aggregation`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
